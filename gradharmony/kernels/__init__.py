"""Compiled kernels: the C++/CUDA extension (:mod:`.ext`) and the Triton kernels.

Nothing is imported or compiled here; the engine loads each backend lazily.
"""
