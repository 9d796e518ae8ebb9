"""What gradient harmonization does, measured: the study behind ``docs/RESULTS.md``.

The claims of "Scaling Multimodal Pre-Training via Cross-Modality Gradient Harmonization"
(Wu et al., NeurIPS 2022) as experiments on the reference VATT trainer (``gradharmony-pretrain``):

1. ``conflicts``: per-sample cosines between the video-audio and video-text loss gradients,
   split by ground-truth aligned / misaligned triplets (do conflicts mark noise?);
2. ``methods``: plain VATT (``sum``), ``pcgrad``, ``gradvac``, curriculum only, ``pcgrad`` +
   curriculum: held-out retrieval and linear probe (do realignment / curriculum help?);
3. ``score``: AUROC and precision at the kept fraction of the conflict score against the
   misaligned labels, over training (does the curriculum's score find the noise?);
4. ``scaling``: the gap between methods as a function of the misalignment rate.

Every claim is a grid methods x seeds x misalignment rates over the same runs (a run is keyed
by its settings, so the claims share them). Modules: :mod:`.grid` (the runs and their launch),
:mod:`.aggregate` (run folders -> raw results), :mod:`.figures`, :mod:`.report`; the command
line is ``python -m studies.harmonization --help``.
"""
