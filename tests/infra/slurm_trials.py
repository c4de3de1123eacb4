"""Repeated real-SLURM trials behind the figures in docs/RELIABILITY.md (a plain script, not
collected by pytest). Needs what the `slurm` fixture needs: root and Debian's slurm-wlm, munge.

    .venv/bin/python -m tests.infra.slurm_trials --requeue 5 --time-limit 3 --seed 0

Starts the one-node cluster of `tests/infra/slurm.py`, runs the uninterrupted reference job
of `tests/test_slurm_real.py` (tiny prior, 2 CPU ranks, 60 steps), then trials of each kind in
turn (each time-limit run sized from the pace of the run before it):

- requeue: a fresh run gets `scontrol requeue` once it has logged a random step 1..40. It
  passes when every rank saved the step it was in, the requeued job resumed at exactly that
  step, logged every step once and ended bit-identical (fp32 weights, EMA and RNG shards,
  losses) to the reference.
- time-limit: the time-limit scenario of the test: SLURM's warning before `--time` makes the
  ranks save, the job requeues itself, resumes exactly there (every step logged once) and ends.

Prints one line per trial and a JSON summary at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from tests.infra.slurm import running_cluster, unavailable
from tests.test_slurm_real import reference_run, requeued_by_the_time_limit, requeued_mid_run


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requeue", type=int, default=5, help="scontrol requeue trials")
    parser.add_argument("--time-limit", type=int, default=3, help="time-limit warning trials")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        print(reason)
        return 2
    rng = random.Random(args.seed)
    summary = {"requeue": {"trials": 0, "exact": 0, "stopped_at": [], "wall_s": []},
               "time_limit": {"trials": 0, "exact": 0, "requeues": 0, "wall_s": []}}
    with running_cluster() as slurm, tempfile.TemporaryDirectory(prefix="unclip-slurm-trials-") as tmp:
        ref = reference_run(slurm, _fresh(Path(tmp) / "reference"))
        pace = ref.pace  # the time-limit run is sized from the latest run's pace (the load may change)
        print(f"reference: start-up {pace.startup_s:.1f} s, {pace.steps_per_s:.1f} steps/s", flush=True)
        kinds = []  # in turn: requeue, time limit, requeue, ...
        for i in range(max(args.requeue, args.time_limit)):
            kinds += ["requeue"] * (i < args.requeue) + ["time_limit"] * (i < args.time_limit)
        for trial, kind in enumerate(kinds):
            started = time.monotonic()
            summary[kind]["trials"] += 1
            root = _fresh(Path(tmp) / f"{kind}-{trial}")
            try:
                if kind == "requeue":
                    at = rng.randint(1, 40)
                    stopped, pace = requeued_mid_run(slurm, ref, root, at_step=at)
                    what = (f"requeued at step >= {at}: every rank saved step {stopped}, resumed there, "
                            "bit-identical")
                    summary[kind]["stopped_at"].append(stopped)
                else:
                    stops, steps = requeued_by_the_time_limit(slurm, pace, root)
                    what = f"warned and requeued {len(stops)}x, saved at {stops} of {steps} steps, each resumed there"
                    summary[kind]["requeues"] += len(stops)
            except AssertionError as err:
                print(f"{kind} {trial}: FAILED: {_first_line(err)}", flush=True)
                continue
            wall = time.monotonic() - started
            summary[kind]["exact"] += 1
            summary[kind]["wall_s"].append(round(wall))
            print(f"{kind} {trial}: {what} ({wall:.0f} s)", flush=True)
    print(json.dumps(summary))
    return 0 if all(s["trials"] == s["exact"] for s in summary.values()) else 1


def _fresh(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
