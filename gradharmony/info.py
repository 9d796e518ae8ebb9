"""Report which engine backends are live on this machine and why the others are not.

    python -m gradharmony.info
"""

from __future__ import annotations

import os
import sys

import torch

from . import __version__
from .engine.backends import PREFERENCE, available_backends, select_backend


def report() -> str:
    lines = [
        f"gradharmony {__version__}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), python {sys.version.split()[0]}",
        f"CUDA available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
        f"GRADHARMONY_BACKEND={os.environ.get('GRADHARMONY_BACKEND', '')!r}",
        "backends:",
    ]
    for name, status in available_backends().items():
        lines.append(f"  {name:7s} {status}")
    from .kernels import ext

    if ext.ops_source():  # prebuilt gradharmony._C, or JIT-compiled into torch's extension cache
        lines.append(f"C++/CUDA ops: {ext.ops_source()} ({ext.ops_path()})")
    forced = os.environ.get("GRADHARMONY_BACKEND", "")
    if forced and forced != "auto":
        try:
            select_backend("auto", torch.zeros(1, 2, 1))
            lines.append(f"auto: forced to {forced!r} by GRADHARMONY_BACKEND")
        except (ValueError, RuntimeError) as e:  # what every backend="auto" call will raise
            lines.append(f"auto: GRADHARMONY_BACKEND is unusable here, backend='auto' calls raise: {e}")
        return "\n".join(lines)
    for dev, prefs in PREFERENCE.items():
        lines.append(f"auto on {dev}: first live of {', '.join(prefs)}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
