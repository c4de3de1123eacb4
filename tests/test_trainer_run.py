"""`unclip train` end to end: 2 CPU ranks of real DeepSpeed (gloo), ZeRO-2/3, exact resume
after kill -9, resume at another world size, SIGTERM, non-finite steps, export."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    TINY_DECODER, TINY_PRIOR, env_for_tests, explain, latest_step, losses, mean_loss, merged, train, unclip, write_job,
)

pytestmark = pytest.mark.slow


def fp32_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The trained (not EMA) fp32 weights of a checkpoint, consolidated by DeepSpeed's tool."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer.safe_load import weights_only_loads

    with weights_only_loads():  # zero_to_fp32 would unpickle the shards; it works without
        return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=f"step_{step:07d}")


def ema_shards(run_dir: Path, step: int, world: int) -> list[dict[str, torch.Tensor]]:
    d = run_dir / "checkpoints" / f"step_{step:07d}"
    return [load_file(d / f"rank_{r:05d}.safetensors") for r in range(world)]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory):
    """The reference: tiny prior, 2 ranks, ZeRO-2, 40 steps, a checkpoint every 10 steps."""
    root = tmp_path_factory.mktemp("prior")
    config = write_job(root / "prior.yaml", TINY_PRIOR)
    run_dir = root / "run"
    done = train(config, run_dir)
    assert done.returncode == 0, explain(done)
    return config, run_dir


def test_prior_zero2_trains_and_checkpoints(prior_run):
    config, run_dir = prior_run
    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, 41))
    assert mean_loss(loss, range(33, 41)) < mean_loss(loss, range(1, 5)) - 0.05, loss
    ckpts = run_dir / "checkpoints"
    assert latest_step(run_dir) == 40
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_{s:07d}" for s in (10, 20, 30, 40)]
    meta = json.loads((ckpts / "step_0000040" / "meta.json").read_text())
    assert meta["complete"] and meta["world_size"] == 2 and meta["zero_stage"] == 2
    assert meta["step"] == 40 and meta["samples_seen"] == 40 * 32 * 2
    assert meta["config"]["model"]["dim"] == 32
    # each rank's own files are checksummed; DeepSpeed's shards are size-checked
    assert "sha256" in meta["files"]["rank_00001.json"] and meta["files"]["zero_pp_rank_1_mp_rank_00_optim_states.pt"]["size"] > 0
    # the two ranks drew different data (their loader states differ) from the same seed
    states = [json.loads((ckpts / "step_0000040" / f"rank_{r:05d}.json").read_text()) for r in (0, 1)]
    assert states[0]["loader"]["rank"] == 0 and states[1]["loader"]["rank"] == 1


def test_kill_minus_9_then_resume_is_bit_identical(prior_run, tmp_path):
    config, reference = prior_run
    run_dir = tmp_path / "run"
    # 1. every rank is SIGKILLed while saving step 20: DeepSpeed's shards are written, meta.json is not
    crashed = train(config, run_dir, env={"UNCLIP_FAULT_KILL_IN_SAVE": "20"})
    assert crashed.returncode == 1, explain(crashed)
    assert latest_step(run_dir) == 10
    partial = run_dir / "checkpoints" / "step_0000020"
    assert partial.is_dir() and not (partial / "meta.json").exists()
    # 2. resume: the half-written step 20 is ignored; then rank 1 SIGKILLs itself after step 25
    crashed = train(config, run_dir, env={"UNCLIP_FAULT_KILL": "1@25"})
    assert crashed.returncode == 1, explain(crashed)
    assert "resumed from" in crashed.stdout and "step 10" in crashed.stdout
    assert "rank 1 failed (killed by SIGKILL)" in crashed.stderr
    assert latest_step(run_dir) == 20 and (partial / "meta.json").is_file()
    # 3. resume from step 20 to the end: bit-identical to the run that never stopped
    resumed = train(config, run_dir)
    assert resumed.returncode == 0, explain(resumed)
    assert "step 20" in resumed.stdout
    assert_same(fp32_weights(run_dir, 40), fp32_weights(reference, 40))
    for mine, theirs in zip(ema_shards(run_dir, 40, 2), ema_shards(reference, 40, 2)):
        assert_same(mine, theirs)  # EMA, RNG states and the stage's generator alike
    assert losses(run_dir)[40] == losses(reference)[40]


def test_resume_at_world_size_1_from_2_rank_checkpoint(prior_run, tmp_path):
    config, reference = prior_run
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step_0000020", run_dir / "checkpoints" / "step_0000020")
    (run_dir / "checkpoints" / "latest").write_text("step_0000020")
    # same global batch on one rank
    done = train(config, run_dir, "--set", "train.micro_batch_size=64", "--set", "train.steps=30", nproc=1)
    assert done.returncode == 0, explain(done)
    assert "world size 2 -> 1, ZeRO 2 -> 2: converting step_0000020 to a universal checkpoint" in done.stdout
    meta = json.loads((run_dir / "checkpoints" / "step_0000030" / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["step"] == 30
    loss, ref = losses(run_dir), losses(reference)
    assert min(loss) == 21  # continued at step 21, did not restart at 1
    # the loss continues from the trained state (weights and Adam moments) instead of starting over
    assert mean_loss(loss, range(21, 26)) < mean_loss(ref, range(1, 6)) - 0.05, (loss, ref)
    # the EMA was re-cut from 2 shards into 1 whole tensor per parameter
    (shard,) = ema_shards(run_dir, 30, 1)
    assert shard["ema/model.to_out.weight"].numel() == 16 * 32


def test_validation_is_held_out_fixed_and_leaves_training_bit_identical(prior_run, tmp_path):
    """The reference job for 10 steps with validation every 5 (sampled cosines included) and
    DeepSpeed's TensorBoard and CSV monitors on: the weights at step 10 are the reference's,
    the logged validation equals a direct computation with them, and the monitors get it."""
    _, reference = prior_run
    extra = {"tensorboard": {"enabled": True}, "csv_monitor": {"enabled": True}}
    job = merged(
        TINY_PRIOR, train={**TINY_PRIOR["train"], "steps": 10}, deepspeed={**TINY_PRIOR["deepspeed"], "extra": extra},
        validation={"every_steps": 5, "batches": 3, "sample_batches": 2, "sample_steps": 4},
    )
    run_dir = tmp_path / "run"
    done = train(write_job(tmp_path / "prior.yaml", job), run_dir)
    assert done.returncode == 0, explain(done)
    weights = fp32_weights(run_dir, 10)
    assert_same(weights, fp32_weights(reference, 10))  # validating changed nothing in training
    for mine, theirs in zip(ema_shards(run_dir, 10, 2), ema_shards(reference, 10, 2)):
        assert_same(mine, theirs)  # nor the EMA, nor any random stream
    records = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert sorted(s for s, r in records.items() if "unclip_validation_loss" in r) == [5, 10]
    # the same figures in this process, from the trained weights of step 10, on one rank
    from launch.config_files import load_config
    from models import stages
    from models.stages import StageContext
    from trainer.engine import StageModule
    from trainer.validation import Validator

    resolved = load_config(run_dir / "config.yaml")
    spec = stages.get("prior")
    module = StageModule(spec, spec.build(resolved), StageContext())
    assert not module.load_state_dict(weights, strict=False).unexpected_keys
    values = Validator(resolved, spec, 0, 1, "cpu").run(module.eval())
    assert len(values) == 5  # the loss and the prior's four cosines
    for name, value in values.items():
        assert records[10][f"unclip_validation_{name}"] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    # DeepSpeed's own monitors, offline: TensorBoard event files and CSV files under RUN_DIR
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / "tiny-prior"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("unclip/validation_loss")]
    assert logged == [(s, pytest.approx(records[s]["unclip_validation_loss"], rel=1e-6)) for s in (5, 10)]
    assert [e.step for e in events.Scalars("unclip/loss")] == list(range(1, 11))
    assert "Train/Samples/lr" in events.Tags()["scalars"]  # DeepSpeed's own events beside ours
    rows = (run_dir / "csv_monitor" / "tiny-prior" / "unclip_validation_prior_image_cosine.csv").read_text().split()
    assert rows == ["step,validation_prior_image_cosine"] + [
        f"{s},{records[s]['unclip_validation_prior_image_cosine']}" for s in (5, 10)
    ]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_decoder_trains_under_zero(zero_stage, tmp_path):
    # validation with the CLIP score: 3 held-out batches over 2 ranks (one pads), sampled under
    # ZeRO-3's gathered forwards, scored by the frozen CLIP the embeddings would come from
    job = merged(
        TINY_DECODER, deepspeed={"zero_stage": zero_stage, "timeout_s": 60},
        model={**TINY_DECODER["model"], "image_embed_dim": 64}, clip={"name": "unclip-tiny"},
        train={"steps": 10, "micro_batch_size": 4, "log_every": 1, "seed": 0, "sample_every": 5},
        checkpoint={"every_steps": 5, "keep_last": 1},
        validation={"every_steps": 5, "batches": 3, "sample_batches": 1, "sample_steps": 2},
    )
    config = write_job(tmp_path / "decoder.yaml", job)
    done = train(config, tmp_path / "run")
    assert done.returncode == 0, explain(done)
    loss = losses(tmp_path / "run")
    assert mean_loss(loss, (8, 9, 10)) < mean_loss(loss, (1, 2, 3)), loss
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")] == ["step_0000010"]  # keep_last=1
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_0000010" / "meta.json").read_text())
    assert meta["zero_stage"] == zero_stage
    # sample grids from the EMA weights (gathered from the ZeRO shards): inputs row, samples row
    from PIL import Image

    grids = sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png"))
    assert grids == ["step_0000005.png", "step_0000010.png"]
    assert Image.open(tmp_path / "run" / "samples" / "step_0000010.png").size == (4 * 8, 2 * 8)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validated = [r for r in records if "unclip_validation_loss" in r]
    assert [r["step"] for r in validated] == [5, 10]
    for record in validated:
        assert 0 <= record["unclip_validation_decoder_clip_score"] <= 1
        assert -1 <= record["unclip_validation_decoder_image_cosine"] <= 1
        assert math.isfinite(record["unclip_validation_loss"])
    # the real images' score does not depend on the weights
    assert validated[0]["unclip_validation_decoder_reference_clip_score"] == validated[1]["unclip_validation_decoder_reference_clip_score"]


def test_prior_zero3_trains(tmp_path):
    job = merged(TINY_PRIOR, deepspeed={"zero_stage": 3, "timeout_s": 60}, checkpoint={"every_steps": 40})
    config = write_job(tmp_path / "prior.yaml", job)
    done = train(config, tmp_path / "run")
    assert done.returncode == 0, explain(done)
    loss = losses(tmp_path / "run")
    assert mean_loss(loss, range(33, 41)) < mean_loss(loss, range(1, 5)) - 0.05, loss


def test_nonfinite_steps_are_skipped_then_stop_the_job(prior_run, tmp_path):
    config, reference = prior_run
    run_dir = tmp_path / "run"
    job = merged(TINY_PRIOR, train={**TINY_PRIOR["train"], "steps": 8, "max_consecutive_nonfinite": 2}, checkpoint={"every_steps": 2, "keep_last": 10})
    config = write_job(tmp_path / "prior.yaml", job)
    # step 3 is NaN once (skipped, counted), then steps 5 and 6 in a row: the job stops
    done = train(config, run_dir, env={"UNCLIP_FAULT_NAN_STEPS": "2,4,5"})
    assert done.returncode == 1, explain(done)
    assert "2 consecutive steps had a non-finite loss" in done.stderr
    assert "non-finite loss or gradient; step skipped" in done.stdout
    assert latest_step(run_dir) == 6
    meta = json.loads((run_dir / "checkpoints" / "step_0000006" / "meta.json").read_text())
    assert meta["nonfinite_steps"] == 3
    # skipped steps change no weights: the saved state is the last good one (after step 4)
    assert_same(fp32_weights(run_dir, 6), fp32_weights(run_dir, 4))


def test_sigterm_writes_a_checkpoint_and_exits_0(tmp_path):
    job = merged(TINY_PRIOR, train={**TINY_PRIOR["train"], "steps": 100000, "log_every": 5}, checkpoint={"every_steps": 100000})
    config = write_job(tmp_path / "prior.yaml", job)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch", "train", "--config", str(config), "--run-dir", str(run_dir), "--nproc", "2"]
    proc = subprocess.Popen(cmd, env=env_for_tests(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.jsonl").is_file() or len(losses(run_dir)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (out, err)
    step = latest_step(run_dir)
    assert 10 <= step < 100000
    assert "stop requested" in out
    assert json.loads((run_dir / "checkpoints" / f"step_{step:07d}" / "meta.json").read_text())["complete"]


def test_export_loads_without_deepspeed(prior_run, tmp_path):
    config, run_dir = prior_run
    out = tmp_path / "prior.safetensors"
    done = unclip("export", str(run_dir), "--out", str(out))
    assert done.returncode == 0, explain(done)
    # a fresh interpreter that never imports DeepSpeed rebuilds the model from the file alone
    code = (
        "import sys, torch\n"
        "from models.loading import load_stage\n"
        f"loaded = load_stage({str(out)!r})\n"
        "model, job = loaded.module, loaded.cfg\n"
        "assert 'deepspeed' not in sys.modules, 'export loading imported deepspeed'\n"
        "assert not any(m.split('.')[0] == 'trainer' for m in sys.modules), 'export loading imported trainer/'\n"
        "g = torch.Generator().manual_seed(0)\n"
        "e = torch.nn.functional.normalize(torch.randn(2, 16, generator=g), dim=-1)\n"
        "enc, mask = torch.randn(2, 4, 8, generator=g), torch.ones(2, 4, dtype=torch.bool)\n"
        "print(type(model).__name__, job.stage, float(model.loss(e, e, enc, mask, generator=g)))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_for_tests())
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("DiffusionPrior prior")
    # the file holds the EMA merged from both ranks' shards
    weights = load_file(out)
    shards = ema_shards(run_dir, 40, 2)
    name = "to_out.weight"
    merged_ema = torch.cat([shards[0][f"ema/model.{name}"], shards[1][f"ema/model.{name}"]])[: weights[name].numel()]
    assert torch.equal(weights[name].reshape(-1), merged_ema)


def test_a_hung_rank_ends_the_job_after_the_collective_timeout(tmp_path):
    job = merged(TINY_PRIOR, train={**TINY_PRIOR["train"], "steps": 20}, deepspeed={"zero_stage": 2, "timeout_s": 5})
    config = write_job(tmp_path / "prior.yaml", job)
    started = time.monotonic()
    done = train(config, tmp_path / "run", env={"UNCLIP_FAULT_HANG": "1@3"})
    assert done.returncode == 1, explain(done)
    assert time.monotonic() - started < 90  # no hang: the survivor's collective timed out
    assert "rank 0: a collective failed, so another rank is gone or stopped responding" in done.stderr
    assert "rank 0 failed" in done.stderr  # the launcher names the rank that exited, then stops the rest
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()  # nothing half-saved
