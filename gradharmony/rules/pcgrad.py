"""PCGrad: projecting conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task
Learning", NeurIPS 2020, Algorithm 1), per sample.

For each loss i, ``g'_i`` starts at ``g_i`` and visits the other gradients ``j != i``; when
``g'_i . g_j < 0``: ``g'_i -= (g'_i . g_j) / |g_j|^2 g_j``. The output is ``sum_i g'_i``
(fused kernel method 1; Gram form in :func:`gradharmony.engine.reference.pcgrad_weights`).

Conventions (docs/RULES.md): sum scale, like torchjd, LibMTL and Pytorch-PCGrad. The visit
list is ``j != i``, as in the paper and torchjd. LibMTL's and Pytorch-PCGrad's loops also
visit ``j = i``, which projects ``g'_i`` off its own ``g_i`` once earlier projections have
turned it against ``g_i`` (possible from K = 3):
``[[-1, 3], [-1, 0], [1, -1]]`` gives ``[0.5, 0.7]`` here, ``[0.6, 0.6]`` there (fixed
order). ``order="random"`` draws a fresh order per sample and loss, as the paper's
``shuffle``; torchjd visits in a fixed order.
"""

from __future__ import annotations

from .base import OrderedRule

__all__ = ["PCGrad"]


class PCGrad(OrderedRule):
    """PCGrad per sample (Yu et al., NeurIPS 2020).

    Args:
        order: "random" (a fresh random visiting order per sample and loss, as in the
            paper's Algorithm 1) or "fixed" (0..K-1). Irrelevant for K = 2.
        seed: seeds the order generator (the state is saved in ``state_dict``).
    """

    name = "pcgrad"
    method_id = 1
