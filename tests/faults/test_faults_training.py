"""A training job (2 CPU ranks, DeepSpeed ZeRO-2) loses rank 0 to `kill -9` mid-step: after
its backward pass of step 6, before that step's optimizer update.

Rank 0 is the special one: it hosts the rendezvous store and writes `meta.json` and
`latest`. Its survivor must not hang (collective timeout), the job must exit 1 naming rank 0,
and the restart must continue from the last complete checkpoint with no optimizer step lost
or repeated.

Covered elsewhere: rank 1 killed between steps and the resume bit-identical, every rank killed inside a
save (tests/test_trainer_run.py::test_kill_minus_9_then_resume_is_bit_identical), a hung rank
(test_a_hung_rank_ends_the_job_after_the_collective_timeout), SIGTERM (test_sigterm_writes_a_checkpoint_and_exits_0),
non-finite steps (test_nonfinite_steps_are_skipped_then_stop_the_job). Repeated trials at random
steps: tests/faults/trials.py, figures in docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import time

import pytest


from tests.helpers import TINY_PRIOR, explain, latest_step, merged, train, write_job

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def test_kill_9_of_rank_0_mid_step_then_exact_step_resume(tmp_path):
    job = merged(TINY_PRIOR, train={**TINY_PRIOR["train"], "steps": 12}, deepspeed={"zero_stage": 2, "timeout_s": 20},
                 checkpoint={"every_steps": 4, "keep_last": 5})
    config = write_job(tmp_path / "prior.yaml", job)
    run_dir = tmp_path / "run"
    started = time.monotonic()
    crashed = train(config, run_dir, env={"UNCLIP_FAULT_KILL_MID_STEP": "0@6"})
    assert crashed.returncode == 1, explain(crashed)
    assert time.monotonic() - started < 120  # the survivor did not wait forever
    assert "rank 0 failed (killed by SIGKILL)" in crashed.stderr
    assert latest_step(run_dir) == 4  # step 8's checkpoint was never reached
    resumed = train(config, run_dir)
    assert resumed.returncode == 0, explain(resumed)
    assert "step 4" in next(line for line in resumed.stdout.splitlines() if "resumed from" in line)
    meta = json.loads((run_dir / "checkpoints" / "step_0000012" / "meta.json").read_text())
    # 12 optimizer steps of 2 ranks x 32 samples, counted once each across the crash
    assert meta["step"] == 12 and meta["samples_seen"] == 12 * 2 * 32
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "unclip_loss" in json.loads(line)]
    # first run: steps 1..5 logged (killed inside step 6); restart: 5..12, each once
    assert steps == [1, 2, 3, 4, 5] + list(range(5, 13)), steps
