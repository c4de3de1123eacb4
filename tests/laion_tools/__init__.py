"""The LAION tools (img2dataset, clip-retrieval, embedding-reader) in a virtual environment of
their own, made once under the repository root and reused while its requirements are unchanged."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VENV = ROOT / ".venv-laion-tools"
REQUIREMENTS = HERE / "requirements.txt"
CLIP_RETRIEVAL = "clip-retrieval==2.45.0"  # --no-deps: see requirements.txt
CREATE_TIMEOUT_S = 900


def _fingerprint() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes() + CLIP_RETRIEVAL.encode()).hexdigest()


@contextlib.contextmanager
def _locked():
    with open(ROOT / ".venv-laion-tools.lock", "w") as lock:  # two pytest processes: one builds
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def tools_python() -> Path:
    """The tools' interpreter, after making their environment if it is missing or stale."""
    python, stamp = VENV / "bin" / "python", VENV / ".requirements.sha256"
    with _locked():
        if python.exists() and stamp.exists() and stamp.read_text() == _fingerprint():
            return python
        shutil.rmtree(VENV, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", "--without-pip", str(VENV)],
            # our pip drives the new interpreter; no bytecode compiling (the tools run a few times)
            [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile", "-r", str(REQUIREMENTS)],
            [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile", "--no-deps",
             CLIP_RETRIEVAL],
        ]
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=CREATE_TIMEOUT_S)
            if done.returncode != 0:
                raise RuntimeError(f"making {VENV} failed: {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        stamp.write_text(_fingerprint())
        return python


def run(python: Path, script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `script` (Python source) with the tools' interpreter; raises with its output on failure."""
    done = subprocess.run([str(python), "-c", script, *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"tools script failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done
