"""Repeated fault trials behind the figures in docs/RELIABILITY.md (a plain script, not collected).

    .venv/bin/python -m tests.faults.trials --kill 5 --kill-in-save 3 --seed 0   (from the repository root)

One reference run of the tiny prior (2 CPU ranks, DeepSpeed ZeRO-2, 20 steps, a checkpoint
every 5) is compared with runs that are hit by a fault and restarted:

- kill: a random rank SIGKILLs itself after a random step k. Expected: exit 1, the launcher
  names the rank, `latest` is the newest checkpoint before k, and the restart resumes there
  and ends with fp32 weights and EMA shards bit-identical to the reference (no lost and no
  repeated optimizer step).
- kill-in-save: every rank dies while saving a random checkpoint step s (DeepSpeed's files
  written, meta.json not). Expected: `latest` still names the previous checkpoint; the restart
  ignores the half-written one with a warning and ends bit-identical to the reference.

Prints one line per trial and a JSON summary at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers import TINY_PRIOR, explain, latest_step, merged, train, write_job

STEPS, EVERY = 20, 5
TRIAL = itertools.count()  # run directories are unique even when two trials draw the same fault


def fp32(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer.safe_load import weights_only_loads

    with weights_only_loads():  # zero_to_fp32 would unpickle the shards; it works without
        return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=f"step_{step:07d}")


def ema(run_dir: Path, step: int) -> list[dict[str, torch.Tensor]]:
    d = run_dir / "checkpoints" / f"step_{step:07d}"
    return [load_file(d / f"rank_{r:05d}.safetensors") for r in range(2)]


def identical(a: Path, b: Path) -> bool:
    wa, wb = fp32(a, STEPS), fp32(b, STEPS)
    if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
        return False
    for sa, sb in zip(ema(a, STEPS), ema(b, STEPS)):
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


def resumed_step(stdout: str) -> int:
    # "resumed from .../step_0000010 (step 10, ...)"
    line = next(line for line in stdout.splitlines() if "resumed from" in line)
    return int(line.split("(step ", 1)[1].split(",", 1)[0])


def kill_trial(config: Path, reference: Path, root: Path, rng: random.Random) -> dict:
    rank, step = rng.randrange(2), rng.randrange(1, STEPS)
    run_dir = root / f"kill{next(TRIAL)}_rank{rank}_step{step}"
    started = time.monotonic()
    crashed = train(config, run_dir, env={"UNCLIP_FAULT_KILL": f"{rank}@{step}"})
    crash_s = time.monotonic() - started
    expect_latest = (step - 1) // EVERY * EVERY  # checkpoints are saved after the fault check
    ok_crash = crashed.returncode == 1 and f"rank {rank} failed (killed by SIGKILL)" in crashed.stderr
    latest = latest_step(run_dir) if (run_dir / "checkpoints" / "latest").exists() else 0
    resumed = train(config, run_dir)
    if resumed.returncode != 0:
        return {"fault": "kill", "rank": rank, "step": step, "ok": False, "why": explain(resumed)[-800:]}
    start = resumed_step(resumed.stdout) if latest else 0
    exact = identical(run_dir, reference)
    return {"fault": "kill", "rank": rank, "step": step, "crash_exit_named_rank": ok_crash, "crash_s": round(crash_s, 1),
            "latest": latest, "expected_latest": expect_latest, "resumed_at": start,
            "lost_steps": latest - start if latest else 0, "bit_identical": exact,
            "ok": ok_crash and latest == expect_latest and start == latest and exact}


def kill_in_save_trial(config: Path, reference: Path, root: Path, rng: random.Random) -> dict:
    step = rng.choice(range(EVERY, STEPS, EVERY))  # the periodic saves (the final one is at STEPS)
    run_dir = root / f"save{next(TRIAL)}_step{step}"
    crashed = train(config, run_dir, env={"UNCLIP_FAULT_KILL_IN_SAVE": str(step)})
    partial = run_dir / "checkpoints" / f"step_{step:07d}"
    latest = latest_step(run_dir) if (run_dir / "checkpoints" / "latest").exists() else 0
    half_written = partial.is_dir() and not (partial / "meta.json").exists()
    resumed = train(config, run_dir)
    if resumed.returncode != 0:
        return {"fault": "kill_in_save", "step": step, "ok": False, "why": explain(resumed)[-800:]}
    start = resumed_step(resumed.stdout) if latest else 0
    exact = identical(run_dir, reference)
    ok = crashed.returncode == 1 and half_written and latest == step - EVERY and start == latest and exact
    return {"fault": "kill_in_save", "step": step, "latest_after_crash": latest, "half_written_left": half_written,
            "resumed_at": start, "bit_identical": exact, "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kill", type=int, default=5, help="kill -9 trials")
    parser.add_argument("--kill-in-save", type=int, default=3, help="kill-during-save trials")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    job = merged(TINY_PRIOR, train={**TINY_PRIOR["train"], "steps": STEPS},
                 checkpoint={"every_steps": EVERY, "keep_last": 10})
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = write_job(root / "prior.yaml", job)
        started = time.monotonic()
        ref = train(config, root / "reference")
        assert ref.returncode == 0, explain(ref)
        print(f"reference run: {time.monotonic() - started:.1f}s", flush=True)
        for _ in range(args.kill):
            results.append(kill_trial(config, root / "reference", root, rng))
            print(json.dumps(results[-1]), flush=True)
        for _ in range(args.kill_in_save):
            results.append(kill_in_save_trial(config, root / "reference", root, rng))
            print(json.dumps(results[-1]), flush=True)
    summary = {kind: {"trials": sum(r["fault"] == kind for r in results),
                      "ok": sum(r["fault"] == kind and r["ok"] for r in results)}
               for kind in ("kill", "kill_in_save")}
    summary["lost_steps_total"] = sum(r.get("lost_steps", 0) for r in results)
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
