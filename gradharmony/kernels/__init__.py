"""Compiled kernels: raw ops and their launchers, nothing of the engine.

- :mod:`.ext`: the C++/CUDA extension's ops ``torch.ops.gradharmony.{gram, combine, solve,
  fused}`` (loading, JIT build, fake kernels);
- :mod:`.triton_gram`, :mod:`.triton_solve`, :mod:`.triton_combine`, :mod:`.triton_fused`: the
  Triton kernels and launchers of each op, :mod:`.triton_launch` their launch configuration
  (:mod:`.triton_harmonize` gathers the launchers);
- :mod:`.spec`: the facts every kernel shares (K limit, op ids, accumulation dtype);
  :mod:`.build_flags`: the compiler flags (setup.py and the JIT build).

Nothing is imported or compiled here; the engine (``gradharmony.engine.backend_ext``,
``backend_triton``) loads each backend lazily.
"""
