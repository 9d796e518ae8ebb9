"""Build of gradharmony with its optional compiled extension ``gradharmony._C``.

The extension holds the C++ (CPU) and CUDA kernels of ``torch.ops.gradharmony.{gram, combine,
fused}`` (sources in ``csrc/``). Build it against the torch already installed:

    pip install --no-build-isolation -e .        # or: pip install --no-build-isolation .

Environment knobs (all optional; defaults in brackets):

- ``GRADHARMONY_SKIP_EXT=1``   [unset] install the pure-Python package only; the ops are then
  JIT-compiled on first use by ``gradharmony.kernels.ext`` (unless ``GRADHARMONY_NO_JIT=1``).
- ``GRADHARMONY_FORCE_CUDA=1`` [unset] the CUDA kernels are required: a missing nvcc, a CPU-only
  torch or a failed build is an error instead of a warning.
- ``GRADHARMONY_CUDA_ARCHS``   ["80;90+PTX"] semicolon-separated SM architectures for nvcc
  (e.g. "90" or "80;86;90"); "+PTX" suffixes are accepted ("90+PTX"); the default's PTX lets
  GPUs newer than sm_90 (Blackwell) JIT the kernels instead of failing with "no kernel image".
- ``MAX_JOBS``                 [cores, at most 8] parallel compile jobs (used by ninja).

The CUDA sources are built only when torch is a CUDA build (``torch.version.cuda``) and nvcc is
found (``CUDA_HOME`` / PATH); a GPU need not be visible. When torch is not importable at build
time, or the build fails, the pure-Python package is installed with a warning: the package then
uses the JIT path or the pure-PyTorch reference. The sources also ship inside the package
(``gradharmony/_csrc``) so that the JIT path works from a wheel. setup.py does no git or network
work.
"""

from __future__ import annotations

import glob
import os
import runpy
import shutil
import sys
import warnings

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
CSRC_PATTERNS = ("*.h", "*.cuh", "*.cpp", "*.cu")
# the compiler flags, shared with the JIT loader (gradharmony/kernels/ext.py): a data-only file,
# executed rather than imported (the package needs torch, which may not be importable here)
FLAGS = runpy.run_path(os.path.join(HERE, "gradharmony", "kernels", "build_flags.py"))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/ into the package as gradharmony/_csrc (for JIT from a wheel)."""

    def run(self):
        super().run()
        dst = os.path.join(self.build_lib, "gradharmony", "_csrc")
        os.makedirs(dst, exist_ok=True)
        for pattern in CSRC_PATTERNS:
            for src in glob.glob(os.path.join(CSRC, pattern)):
                shutil.copy2(src, dst)


def _cuda_archs() -> list[str]:
    archs = os.environ.get("GRADHARMONY_CUDA_ARCHS", "80;90+PTX")
    flags = []
    for a in filter(None, (x.strip() for x in archs.replace(",", ";").split(";"))):
        ptx = a.endswith("+PTX")
        a = a.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{a},code=compute_{a}")
    return flags


def _extensions_and_cmdclass():
    """(ext_modules, cmdclass) for the compiled extension, or ([], {}) with a warning."""
    cmdclass = {"build_py": BuildPyWithSources}
    if _env_flag("GRADHARMONY_SKIP_EXT"):
        return [], cmdclass
    force_cuda = _env_flag("GRADHARMONY_FORCE_CUDA")
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as exc:  # torch absent at build time (e.g. isolated build)
        if force_cuda:
            raise RuntimeError(f"GRADHARMONY_FORCE_CUDA=1 but torch is not importable: {exc}")
        warnings.warn(
            f"gradharmony: torch not importable at build time ({exc}); installing the pure-Python "
            "package (the kernels are JIT-compiled on first use). Use --no-build-isolation.",
            stacklevel=1,
        )
        return [], cmdclass

    if "MAX_JOBS" not in os.environ:
        os.environ["MAX_JOBS"] = str(max(1, min(8, os.cpu_count() or 1)))

    sources = [os.path.join("csrc", "ops.cpp"), os.path.join("csrc", "harmonize_cpu.cpp")]
    # headers (and the .cu files, so that an sdist made on a CPU-only machine still carries
    # them): rebuild triggers, and (setuptools >= 65) shipped in the sdist with the sources
    depends = sorted(
        os.path.relpath(p, HERE)
        for pattern in ("*.h", "*.cuh", "*.cu")
        for p in glob.glob(os.path.join(CSRC, pattern))
    )
    cxx = list(FLAGS["CXX_FLAGS"])
    with_cuda = bool(torch.version.cuda) and ce.CUDA_HOME is not None
    if force_cuda and not with_cuda:
        raise RuntimeError(
            "GRADHARMONY_FORCE_CUDA=1 but the CUDA build is impossible: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={ce.CUDA_HOME!r}"
        )
    if with_cuda:
        sources.append(os.path.join("csrc", "harmonize_cuda.cu"))
        nvcc = [*FLAGS["NVCC_FLAGS"], *_cuda_archs()]
        ext = ce.CUDAExtension(
            "gradharmony._C", sources, depends=depends,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=list(FLAGS["LD_FLAGS"]),
        )
    else:
        ext = ce.CppExtension(
            "gradharmony._C", sources, depends=depends, extra_compile_args={"cxx": cxx},
            extra_link_args=list(FLAGS["LD_FLAGS"]),
        )

    base = ce.BuildExtension.with_options(use_ninja=True)

    class SafeBuildExt(base):
        """BuildExtension that degrades to a pure-Python install when compilation fails."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                if force_cuda:
                    raise
                warnings.warn(
                    f"gradharmony: building the C++/CUDA extension failed ({exc}); installing the "
                    "pure-Python package (JIT compile on first use, or the PyTorch reference).",
                    stacklevel=1,
                )
                print(f"WARNING: gradharmony extension build failed: {exc}", file=sys.stderr)

    cmdclass["build_ext"] = SafeBuildExt
    return [ext], cmdclass


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
