"""Slow tool runs of the test suite, started in the background when collection ends.

A check that only runs an external tool in a subprocess (nvcc, Triton's compiler, a JIT
build in a fresh process) spends its time in that tool, not in pytest, so the tool can run
on the second core while the rest of the suite runs on the first. Such a check

1. registers its command with ``@job(name)`` (a function of a fresh working folder that
   returns :class:`Spec`), and
2. marks its test ``@pytest.mark.background(name)`` and calls :func:`result` (the
   ``subprocess.CompletedProcess`` and the working folder) where it used to call
   ``subprocess.run``; its assertions stay in the test.

tests/conftest.py starts the jobs of the selected tests when collection ends, one at a time
(one extra core), in the order of ``priority``; a test whose job has not started yet runs
it itself, so a test run alone behaves as before. A job that outlives the session is killed.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

__all__ = ["Spec", "job", "result", "start", "close"]


@dataclass
class Spec:
    argv: list
    timeout: float
    env: Optional[dict] = None
    cwd: Optional[str] = None


@dataclass
class _Job:
    name: str
    make: Callable[[Path], Spec]
    priority: int
    workdir: Optional[Path] = None
    started: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    proc: Optional[subprocess.Popen] = None
    res: Optional[subprocess.CompletedProcess] = None
    error: Optional[BaseException] = None


_JOBS: dict[str, _Job] = {}
_lock = threading.Lock()
_thread: Optional[threading.Thread] = None
_root: Optional[Path] = None
_closed = False


def job(name: str, priority: int = 50):
    """Register ``fn(workdir) -> Spec`` as the background job ``name`` (lower priority first)."""

    def deco(fn: Callable[[Path], Spec]) -> Callable[[Path], Spec]:
        if name not in _JOBS:
            _JOBS[name] = _Job(name, fn, priority)
        return fn

    return deco


def _claim(name: str) -> Optional[_Job]:
    """Mark ``name`` started (under the lock); None if it already was."""
    global _root
    j = _JOBS[name]
    if j.started:
        return None
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="gh_tests_bg_"))
    j.started = True
    j.workdir = _root / name
    j.workdir.mkdir()
    return j


def _run(j: _Job) -> None:
    try:
        spec = j.make(j.workdir)
        with _lock:
            if _closed:
                raise RuntimeError(f"background job {j.name!r}: the session is over")
            j.proc = subprocess.Popen(spec.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=spec.env, cwd=spec.cwd)
        try:
            out, err = j.proc.communicate(timeout=spec.timeout)
        except subprocess.TimeoutExpired:
            j.proc.kill()
            out, err = j.proc.communicate()
            raise subprocess.TimeoutExpired(spec.argv, spec.timeout, out, err)
        j.res = subprocess.CompletedProcess(spec.argv, j.proc.returncode, out, err)
    except BaseException as exc:  # handed to the test that waits for it
        j.error = exc
    finally:
        j.done.set()


def _worker(names: list) -> None:
    for name in names:
        with _lock:
            j = None if _closed else _claim(name)
        if j is not None:
            _run(j)


def start(names) -> None:
    """Run the registered jobs ``names`` one after another in a worker thread."""
    global _thread
    todo = sorted((n for n in set(names) if n in _JOBS), key=lambda n: (_JOBS[n].priority, n))
    if not todo or _thread is not None:
        return
    _thread = threading.Thread(target=_worker, args=(todo,), name="gh-tests-background", daemon=True)
    _thread.start()


def result(name: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Wait for the job ``name`` (run it here if it has not started) and return
    ``(CompletedProcess, working folder)``; re-raises what the run raised (e.g. a timeout)."""
    if name not in _JOBS:
        raise KeyError(f"no background job {name!r} (register it with @job)")
    with _lock:
        j = _claim(name)
    if j is not None:
        _run(j)
    j = _JOBS[name]
    j.done.wait()
    if j.error is not None:
        raise j.error
    assert j.res is not None and j.workdir is not None
    return j.res, j.workdir


def close() -> None:
    """Kill a job still running, wait for the worker, remove the working folders."""
    global _closed
    with _lock:
        _closed = True
        procs = [j.proc for j in _JOBS.values() if j.proc is not None and j.proc.poll() is None]
    for p in procs:
        p.kill()
    if _thread is not None:
        _thread.join(timeout=30)
    if _root is not None:
        shutil.rmtree(_root, ignore_errors=True)
