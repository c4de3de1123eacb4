"""`unclip precompute` from the command line: local ranks, exit codes."""

import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.shards import write_shards
from launch.cli import main
from launch.precompute_cmd import job_rank

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo" / "precompute.yaml"


def test_wrong_stage_and_missing_shards_exit_2(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("stage: prior\n")
    assert main(["precompute", "--config", str(job)]) == 2
    assert "not 'precompute'" in capsys.readouterr().err
    assert main(["precompute", "--config", str(CONFIG), "--out", str(tmp_path / "emb")]) == 2
    assert "shards" in capsys.readouterr().err


def test_rank_from_arguments_and_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                "PMI_RANK", "PMI_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert job_rank(None, None) == (0, 1)
    assert job_rank(3, 4) == (3, 4)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert job_rank(None, None) == (2, 8)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert job_rank(None, None) == (1, 2)
    with pytest.raises(ValueError, match="together"):
        job_rank(1, None)
    with pytest.raises(ValueError, match="not in"):
        job_rank(5, 2)


@pytest.mark.slow
def test_two_local_ranks_write_what_one_rank_writes(tmp_path):
    shards = tmp_path / "shards"
    write_shards("shapes", str(shards), count=48, per_shard=12, size=32)
    pattern = str(shards / "shard-{000000..000003}.tar")
    common = [sys.executable, "-m", "launch", "precompute", "--config", str(CONFIG), "--shards", pattern,
              "--set", "batch_size=8", "--set", "num_workers=0"]
    two = subprocess.run([*common, "--out", str(tmp_path / "two"), "--nproc", "2"], capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert "rank 0/2" in two.stdout and "rank 1/2" in two.stdout
    assert main(["precompute", "--config", str(CONFIG), "--shards", pattern, "--out", str(tmp_path / "one"),
                 "--set", "batch_size=8", "--set", "num_workers=0"]) == 0
    assert (tmp_path / "two" / "_SUCCESS").exists()
    for i in range(4):
        name = f"shard-{i:06d}.tar"
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
