"""Checkpoint bookkeeping without DeepSpeed processes: completion marker, checksums, the
fallback when `latest` names a half-written checkpoint, keep-last-K, unwritable run
directories, and refusing a checkpoint of an incompatible job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import CheckpointError, Checkpoints, config_differences, validate
from tests.helpers import TINY_PRIOR, merged, unclip, write_job


class FakeEngine:
    """Writes a file where DeepSpeed would write its shards."""

    def save_checkpoint(self, root: str, tag: str, save_latest: bool) -> None:
        assert save_latest is False  # `latest` is ours, written after every rank finished
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)


def save(ckpts: Checkpoints, step: int, value: float = 1.0) -> Path:
    return ckpts.save(
        FakeEngine(), step,
        rank_tensors={"ema/w": torch.full((3,), value)}, rank_state={"loader": {"index": step}, "rng": {}},
        buffers={"b": torch.zeros(2)}, meta={"step": step, "world_size": 1, "config": {"stage": "prior"}},
    )


def test_save_writes_meta_last_and_latest_atomically(tmp_path):
    ckpts = Checkpoints(tmp_path / "checkpoints", 0, 1, keep_last=2)
    path = save(ckpts, 10)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["complete"] and meta["step"] == 10
    assert set(meta["files"]) == {"mp_rank_00_model_states.pt", "rank_00000.safetensors", "rank_00000.json", "buffers.safetensors"}
    assert "sha256" in meta["files"]["rank_00000.json"] and meta["files"]["mp_rank_00_model_states.pt"] == {"size": 100}
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000010"
    assert validate(path) is None
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))


def test_keep_last_k(tmp_path):
    ckpts = Checkpoints(tmp_path / "checkpoints", 0, 1, keep_last=2)
    for step in (1, 2, 3, 4):
        save(ckpts, step)
    assert [p.name for p in ckpts.step_dirs()] == ["step_0000003", "step_0000004"]


def test_half_written_checkpoint_is_detected_and_skipped(tmp_path, caplog):
    ckpts = Checkpoints(tmp_path / "checkpoints", 0, 1, keep_last=5)
    good = save(ckpts, 2)
    bad = save(ckpts, 4)
    # a crash during the next save: files but no meta.json
    partial = tmp_path / "checkpoints" / "step_0000006"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half")
    assert ckpts.find_latest() == bad
    # `latest` naming a checkpoint whose shard was truncated: fall back, with a warning
    (bad / "mp_rank_00_model_states.pt").write_bytes(b"x" * 50)
    assert "expected 100" in validate(bad)
    with caplog.at_level("WARNING"):
        assert ckpts.find_latest() == good
    assert "unusable" in caplog.text and "step_0000006" in caplog.text
    # a flipped byte in our own files fails its checksum
    blob = (good / "rank_00000.json").read_bytes()
    (good / "rank_00000.json").write_bytes(blob.replace(b"2", b"3", 1))
    assert "sha256" in validate(good)
    assert ckpts.find_latest() is None


def test_unwritable_run_dir_is_a_clear_error_and_keeps_the_previous(tmp_path):
    ckpts = Checkpoints(tmp_path / "checkpoints", 0, 1, keep_last=5)
    good = save(ckpts, 2)
    # a file where the checkpoint directory must go (permissions do not stop root; this does)
    broken = Checkpoints(tmp_path / "not_a_dir" / "checkpoints", 0, 1, keep_last=5)
    (tmp_path / "not_a_dir").write_text("a file")
    with pytest.raises(CheckpointError, match="cannot write checkpoint: rank 0: .*previous checkpoint is intact"):
        save(broken, 4)
    assert ckpts.find_latest() == good and validate(good) is None


def test_config_differences_names_the_fields():
    a = {"stage": "prior", "model": {"dim": 32, "depth": 1}, "train": {"steps": 10}}
    b = {"stage": "prior", "model": {"dim": 64, "depth": 1}, "train": {"steps": 99}}
    assert config_differences(a, b) == ["model.dim: checkpoint 32, config 64"]
    assert config_differences(a, {**a, "stage": "decoder"}) == ["stage: checkpoint 'prior', config 'decoder'"]


def test_train_refuses_an_incompatible_run_before_starting(tmp_path):
    ckpts = Checkpoints(tmp_path / "run" / "checkpoints", 0, 1, keep_last=2)
    ckpts.save(
        FakeEngine(), 4, rank_tensors={"x": torch.zeros(1)}, rank_state={}, buffers={},
        meta={"step": 4, "world_size": 1, "config": merged(TINY_PRIOR, model={"dim": 16})},
    )
    config = write_job(tmp_path / "prior.yaml", TINY_PRIOR)
    done = unclip("train", "--config", str(config), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 2
    assert "model.dim: checkpoint 16, config 32" in done.stderr and "--no-resume" in done.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_resume_refuses_crossing_the_zero3_boundary(tmp_path):
    from trainer.checkpoint import resume_problem

    meta = {"config": TINY_PRIOR, "zero_stage": 2}
    assert resume_problem(meta, merged(TINY_PRIOR, deepspeed={"zero_stage": 1}), tmp_path) is None
    problem = resume_problem(meta, merged(TINY_PRIOR, deepspeed={"zero_stage": 3}), tmp_path)
    assert "written with ZeRO 2" in problem and "under ZeRO 3" in problem
