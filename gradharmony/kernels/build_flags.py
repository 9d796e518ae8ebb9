"""Compiler flags of the C++/CUDA extension, read by setup.py and by the JIT loader.

Data only, no imports: setup.py executes this file before torch (or the package) may be
importable.
"""

#: C++ flags (CPU sources and the host side of the CUDA sources). -ffp-contract=off keeps the
#: CPU kernels' rounding that of the reference (no fused multiply-adds unless written).
CXX_FLAGS = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"]

#: nvcc flags (the architectures are added by setup.py, or picked by torch for the JIT build).
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]

#: Linker flags.
LD_FLAGS = ["-fopenmp"]
