"""Peak memory of one workload, each in its own fresh process so that one model's allocations
(or the allocator's cached pages) never hide or inflate another's.

CPU: the resident-set high-water mark (VmHWM) above the resident set after imports and one
throwaway training step of a 2-layer net (which loads the optimizer's and the kernels' shared
machinery for both sides alike). The mark
is reset after imports through /proc/self/clear_refs, so the import spike does not count; where
that is not allowed, the process's lifetime peak (getrusage) is used instead, which can only
overstate. CUDA: `torch.cuda.max_memory_allocated` (the process starts at zero).

The counted work: building the model and its inputs, then two training steps (so the AdamW
states exist) or one sampling call with 2 DDIM steps (a sampling loop holds no more memory at
step 50 than at step 2: nothing accumulates across steps).

    python -m benchmarks.memory ours prior train quick cpu      # prints one JSON line
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
PROBE_SAMPLE_STEPS = 2


def _status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _warm_shared_machinery(torch, device) -> None:
    """Load into the baseline what either side would otherwise pay for on first use and the
    other at import: the first AdamW pulls in torch._dynamo (~170 MB of modules, which the
    peer's imports have already loaded), the first matmul/conv the BLAS and oneDNN state."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4)).to(device)
    net(torch.randn(2, 3, 8, 8, device=device)).square().mean().backward()
    torch.optim.AdamW(net.parameters()).step()


def probe(impl: str, kind: str, action: str, preset: str, device: str, threads: int) -> dict:
    """Run in a fresh process: the peak bytes above the post-import baseline."""
    import gc
    import importlib

    import torch

    from benchmarks.runtime import Runtime
    from benchmarks.specs import PRESETS

    torch.set_num_threads(threads)
    adapter = importlib.import_module("benchmarks.ours" if impl == "ours" else "benchmarks.peer")
    if impl != "ours" and adapter.load() is None:
        return {"error": "not installed"}
    runtime = Runtime.for_device(device)
    spec = getattr(PRESETS[preset], kind)
    _warm_shared_machinery(torch, runtime.device)
    gc.collect()
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
        baseline, method = torch.cuda.memory_allocated(runtime.device), "max_memory_allocated"
    else:
        baseline = (_status_kib("VmRSS") or 0) * 1024
        method = "VmHWM" if _reset_hwm() else "ru_maxrss"
    bench = getattr(adapter, f"build_{kind}")(spec, runtime, sample_steps=PROBE_SAMPLE_STEPS)
    for _ in range(2 if action == "train" else 1):
        bench.train_step() if action == "train" else bench.sample()
    if runtime.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(runtime.device)
    elif method == "VmHWM":
        peak = (_status_kib("VmHWM") or 0) * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": int(peak - baseline), "method": method}


def peak_memory(impl: str, kind: str, action: str, preset: str, device: str, threads: int,
                timeout: float = 600) -> tuple[Optional[int], str]:
    """(peak bytes, note) of one workload measured in a fresh `python -m benchmarks.memory`."""
    cmd = [sys.executable, "-m", "benchmarks.memory", impl, kind, action, preset, device, str(threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timed out"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"probe failed: {tail[:120]}"
    result = json.loads(lines[-1])
    if "error" in result:
        return None, result["error"]
    return result["peak_bytes"], result["method"]


def main(argv: list[str]) -> None:
    impl, kind, action, preset, device, threads = argv
    print(json.dumps(probe(impl, kind, action, preset, device, int(threads))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
