"""`unclip launch --slurm` and `unclip precompute --slurm --array` on a real SLURM cluster.

The `slurm` fixture (tests/conftest.py, tests/infra/slurm.py) runs Debian's slurmctld,
slurmd and munged on this machine, one CPU node; every test submits jobs with sbatch, as a
user would through the unclip CLI, and waits for them (bounded). Training jobs run on the
CPU node (`--gpus-per-node 0 --nproc 2`): 2 ranks of real DeepSpeed over gloo.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from data_pipeline.shards import write_shards
from launch.cli import main as unclip_main
from launch.launchers import free_port
from tests.infra.slurm import TIME_CHECK_PERIOD_S
from tests.test_trainer_run import assert_same, ema_shards, fp32_weights
from tests.helpers import TINY_PRIOR, explain, latest_step, losses, merged, unclip, write_job

pytestmark = pytest.mark.slow

STEPS = 60
JOB = merged(TINY_PRIOR, train={**TINY_PRIOR["train"], "steps": STEPS}, checkpoint={"every_steps": 10, "keep_last": 10})
PRECOMPUTE = Path(__file__).resolve().parent.parent / "configs" / "demo" / "precompute.yaml"
TIMINGS: dict[str, float] = {}  # wall seconds of each scenario, printed for docs/RELIABILITY.md


def submit_training(slurm, config: Path, run_dir: Path, *extra: str) -> int:
    """`unclip launch --slurm` on the CPU node: 2 ranks, 2 CPUs; the job id sbatch printed."""
    done = unclip(
        "launch", "--config", str(config), "--run-dir", str(run_dir), "--slurm", "--gpus-per-node", "0",
        "--nproc", "2", "--cpus-per-task", "2", "--mem", "2G", "--master-port", str(free_port()), *extra,
        env=slurm.env, timeout=120,
    )
    assert done.returncode == 0, explain(done)
    return int(re.search(r"Submitted batch job (\d+)", done.stdout).group(1))


def job_log(run_dir: Path, job_id: int) -> str:
    path = run_dir / "logs" / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for(condition: Callable[[], bool], timeout: float, what: str, context: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout:.0f} s\n{context()}")
        time.sleep(0.1)


def stops_and_resumes(log: str) -> tuple[list[int], list[int]]:
    """The steps each run saved at on a stop request, and the steps each run resumed at."""
    stops = [int(s) for s in re.findall(r"stop requested \(signal\): saving a checkpoint at step (\d+)", log)]
    resumes = [int(s) for s in re.findall(r"resumed from \S+ \(step (\d+),", log)]
    return stops, resumes


def logged_steps(run_dir: Path) -> list[int]:
    """The steps of RUN_DIR/metrics.jsonl in the order they were logged, across restarts."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "unclip_loss" in r]


def assert_ends_like(run_dir: Path, reference: Path) -> None:
    """Bit-identical end state: fp32 weights, each rank's EMA shard (with its RNG states), losses."""
    assert_same(fp32_weights(run_dir, STEPS), fp32_weights(reference, STEPS))
    for mine, theirs in zip(ema_shards(run_dir, STEPS, 2), ema_shards(reference, STEPS, 2), strict=True):
        assert_same(mine, theirs)
    assert losses(run_dir) == losses(reference)


@dataclasses.dataclass(frozen=True)
class Pace:
    """How fast this machine ran a job's last start: seconds from the job's start to its first
    optimizer step, then optimizer steps per second."""

    startup_s: float
    steps_per_s: float


def pace_of(run_dir: Path, record: dict[str, str]) -> Pace:
    started = time.mktime(time.strptime(record["StartTime"], "%Y-%m-%dT%H:%M:%S"))
    times = [r["time"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "unclip_loss" in r and r["time"] >= started]
    return Pace(times[0] - started, (len(times) - 1) / max(times[-1] - times[0], 1e-3))


@dataclasses.dataclass(frozen=True)
class Reference:
    """The uninterrupted run under SLURM."""

    config: Path
    run_dir: Path
    job: int
    pace: Pace


def reference_run(slurm, root: Path) -> Reference:
    config = write_job(root / "prior.yaml", JOB)
    run_dir = root / "run"
    started = time.monotonic()
    job = submit_training(slurm, config, run_dir)
    record = slurm.wait_finished(job, timeout=600)[0]
    TIMINGS["reference"] = time.monotonic() - started
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "0", (record, job_log(run_dir, job))
    return Reference(config, run_dir, job, pace_of(run_dir, record))


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory) -> Reference:
    return reference_run(slurm, tmp_path_factory.mktemp("slurm-reference"))


def test_a_training_job_runs_to_completion_with_its_checkpoints(reference):
    run_dir, job = reference.run_dir, reference.job
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    assert latest_step(run_dir) == STEPS
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{s:07d}" for s in range(10, STEPS + 1, 10)]
    meta = json.loads((run_dir / "checkpoints" / f"step_{STEPS:07d}" / "meta.json").read_text())
    assert meta["complete"] and meta["world_size"] == 2 and meta["step"] == STEPS
    log = job_log(run_dir, job)
    assert f"unclip: job {job} (restart 0) on 1 node(s)" in log
    script = (run_dir / "launch" / "train.sbatch").read_text()
    assert "--gpus-per-node" not in script and "#SBATCH --cpus-per-task=2" in script  # CPU mode: no GRES


def test_scontrol_requeue_mid_run_checkpoints_every_rank_and_resumes_exactly(slurm, reference, tmp_path):
    requeued_mid_run(slurm, reference, tmp_path, at_step=3)


def requeued_mid_run(slurm, reference: Reference, root: Path, at_step: int) -> tuple[int, Pace]:
    """`scontrol requeue` once the job has logged `at_step`: every rank saves the step it is
    in, the job resumes there and ends bit-identical to the reference. The step it stopped at,
    and the pace of the resumed run."""
    run_dir = root / "run"
    started = time.monotonic()
    job = submit_training(slurm, reference.config, run_dir)
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and max(logged_steps(run_dir), default=0) >= at_step, 600,
             f"at step {at_step}", lambda: job_log(run_dir, job) + slurm.logs())
    slurm.run("scontrol", "requeue", str(job))  # what a preemption with PreemptMode=REQUEUE does
    record = slurm.wait_finished(job, timeout=600)[0]
    TIMINGS["requeue"] = time.monotonic() - started
    log = job_log(run_dir, job)
    assert record["JobState"] == "COMPLETED" and record["Restarts"] == "1", (record, log)
    stops, resumes = stops_and_resumes(log)
    assert len(stops) == 1 and at_step <= stops[0] < STEPS, log
    assert resumes == stops and "(restart 1)" in log, log  # the requeued job resumed at exactly that step
    meta = json.loads((run_dir / "checkpoints" / f"step_{stops[0]:07d}" / "meta.json").read_text())
    assert meta["complete"] and {"rank_00000.safetensors", "rank_00001.safetensors"} <= set(meta["files"])
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))  # none lost, none repeated
    assert_ends_like(run_dir, reference.run_dir)
    return stops[0], pace_of(run_dir, record)


def test_time_limit_warning_checkpoints_requeues_itself_and_resumes(slurm, reference, tmp_path):
    requeued_by_the_time_limit(slurm, reference.pace, tmp_path)


def requeued_by_the_time_limit(slurm, pace: Pace, root: Path) -> tuple[list[int], int]:
    """`--time` and `--signal-lead` such that SLURM's warning (USR1 to the batch shell) comes
    while the ranks train: they checkpoint, the script requeues the job, it resumes and ends.
    The steps each run stopped at, and the steps of the run.

    slurmctld sends the warning at its first 30-s check no earlier than 30 s before it is due
    (`tests/infra/slurm.py`). The job is let start just after a check, so with --time 2 and
    --signal-lead 65 the warning is due 25 s after the start and comes at the next check, 29 s
    in; the requeued run starts ~10 s later, so its own warning would come ~50 s into it. The
    run is sized from a recent run's `pace` to be mid-way at 29 s (a machine that starts slowly
    waits k more checks: --time 2+k, --signal-lead 65+30k).
    """
    k = max(0, math.ceil((1.25 * pace.startup_s + 5 - 29) / TIME_CHECK_PERIOD_S))
    warn_after_s = 29 + TIME_CHECK_PERIOD_S * k
    # 1.4x the steps that pace fits before the warning, and 8 s more: still training when it
    # comes after a faster start or at a faster pace, and done within the requeued run's ~50 s
    steps = int(pace.steps_per_s * (1.4 * (warn_after_s - pace.startup_s) + 8)) + 20
    job_cfg = merged(JOB, train={**JOB["train"], "steps": steps}, checkpoint={"every_steps": 10**6, "keep_last": 2})
    config = write_job(root / "prior.yaml", job_cfg)
    run_dir = root / "run"
    started = time.monotonic()
    slurm.set_partition(up=False)  # the job is accepted and waits: the test picks its start
    try:
        job = submit_training(slurm, config, run_dir, "--time", str(2 + k), "--signal-lead", str(65 + 30 * k))
        slurm.next_time_check()
    finally:
        slurm.set_partition(up=True)
    record = slurm.wait_finished(job, timeout=300 + 4 * warn_after_s)[0]
    TIMINGS["time limit"] = time.monotonic() - started
    log = job_log(run_dir, job)
    assert record["JobState"] == "COMPLETED", (record, log)
    warnings = log.count("unclip: time limit near; checkpointing and requeueing")
    assert warnings >= 1 and int(record["Restarts"]) == warnings, (record, log)
    stops, resumes = stops_and_resumes(log)
    assert stops, f"the warning came after the last of {steps} steps: this run was faster than {pace}\n{log}"
    assert 0 < stops[0] < steps, log
    # each run resumed exactly where the one before stopped; a warning that lands as the last
    # step finishes requeues a finished run once more, which resumes at the end and stops
    assert resumes[:len(stops)] == stops and set(resumes[len(stops):]) <= {steps}, log
    assert logged_steps(run_dir) == list(range(1, steps + 1))  # every step ran once: none lost, none repeated
    assert latest_step(run_dir) == steps
    return stops, steps


def test_precompute_job_array_equals_one_process_and_a_resubmission_skips_done_shards(slurm, tmp_path):
    shards = tmp_path / "shards"
    write_shards("shapes", str(shards), count=48, per_shard=12, size=32)
    pattern = str(shards / "shard-{000000..000003}.tar")
    common = ["precompute", "--config", str(PRECOMPUTE), "--shards", pattern, "--set", "batch_size=8",
              "--set", "num_workers=0"]
    assert unclip_main([*common, "--out", str(tmp_path / "one")]) == 0  # the 1-process reference
    out, logs = tmp_path / "array", tmp_path / "slurm"
    array = [*common, "--out", str(out), "--slurm", "--array", "2", "--slurm-dir", str(logs), "--mem", "1G",
             "--time", "10"]

    def submit() -> int:
        done = unclip(*array, env=slurm.env, timeout=120)
        assert done.returncode == 0, explain(done)
        job = int(re.search(r"Submitted batch job (\d+)", done.stdout).group(1))
        records = slurm.wait_finished(job, timeout=240)
        assert len(records) == 2 and all(r["JobState"] == "COMPLETED" for r in records), records
        return job

    def task_summaries(job: int) -> list[str]:
        return [(logs / f"unclip-precompute-{job}_{task}.out").read_text() for task in (0, 1)]

    started = time.monotonic()
    first = submit()
    TIMINGS["precompute array"] = time.monotonic() - started
    summaries = task_summaries(first)
    assert "rank 0/2: 2 shard(s) written, 0 already done" in summaries[0], summaries[0]
    assert "rank 1/2: 2 shard(s) written, 0 already done" in summaries[1], summaries[1]
    assert_same_files(out, tmp_path / "one")
    # a task lost its last shard (say the node died as it finished): resubmitting redoes only that
    for name in ("shard-000003.tar", "shard-000003.tar.json", "_SUCCESS"):
        (out / name).unlink(missing_ok=True)
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    started = time.monotonic()
    second = submit()
    TIMINGS["precompute resubmission"] = time.monotonic() - started
    summaries = task_summaries(second)
    assert "rank 0/2: 0 shard(s) written, 2 already done" in summaries[0], summaries[0]
    assert "rank 1/2: 1 shard(s) written, 1 already done" in summaries[1], summaries[1]
    untouched = {n: t for n, t in kept.items() if n.startswith("shard-0000") and not n.startswith("shard-000003")}
    assert untouched and all((out / n).stat().st_mtime_ns == t for n, t in untouched.items())
    assert_same_files(out, tmp_path / "one")


def assert_same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def teardown_module(module) -> None:
    if TIMINGS:
        print("\nreal-SLURM wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in TIMINGS.items()), file=sys.stderr)
