"""`unclip launch`: torchrun over 2 simulated nodes (run for real), SLURM script content,
DeepSpeed hostfile command, the memory plan, and rank discovery from any launcher."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launch.cli import main
from launch.launchers import free_port, read_hostfile
from trainer.distributed import world_info_from_env
from tests.helpers import TINY_PRIOR, env_for_tests, latest_step, merged, write_job


@pytest.mark.slow
def test_two_simulated_nodes_under_torchrun_train_and_checkpoint(tmp_path):
    job = merged(TINY_PRIOR, train={**TINY_PRIOR["train"], "steps": 6}, checkpoint={"every_steps": 3, "keep_last": 2})
    config = write_job(tmp_path / "prior.yaml", job)
    run_dir = tmp_path / "run"
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "launch", "launch", "--config", str(config), "--run-dir", str(run_dir),
             "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port, "--nproc", "1"],
            env=env_for_tests(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=300) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(nodes, outputs):
        assert p.returncode == 0, (out[-2000:], err[-4000:])
    assert "--nnodes=2" in outputs[0][0] and "--node-rank=1" in outputs[1][0]
    assert latest_step(run_dir) == 6
    meta = json.loads((run_dir / "checkpoints" / "step_0000006" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["complete"]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`unclip ARGS` in this process (the dry runs start nothing): (exit code, stdout, stderr)."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_slurm_script_content(tmp_path, capsys):
    config = write_job(tmp_path / "prior.yaml", TINY_PRIOR)
    code, script, err = cli(
        capsys, "launch", "--config", str(config), "--slurm", "--nnodes", "4", "--gpus-per-node", "8", "--time", "12:00:00",
        "--partition", "gpu", "--run-dir", str(tmp_path / "run"), "--dry-run",
    )
    assert code == 0, err
    for line in (
        "#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=12:00:00",
        "#SBATCH --partition=gpu", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@",
    ):
        assert line in script, line
    assert script.startswith("#!/bin/bash\n")
    srun = next(line for line in script.splitlines() if "torch.distributed.run" in line)
    for arg in ("--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", '"--rdzv-endpoint=$MASTER_ADDR:29500"',
                '"--rdzv-id=$SLURM_JOB_ID"', "-m launch.worker", f"--run-dir {tmp_path / 'run'}"):
        assert arg in srun, arg
    assert "srun --kill-on-bad-exit=1" in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script and "scontrol requeue" in script
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    # and it is valid bash
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_slurm_writes_the_script_into_the_run(tmp_path, capsys, monkeypatch):
    config = write_job(tmp_path / "prior.yaml", TINY_PRIOR)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here: write the script, do not submit
    code, out, err = cli(capsys, "launch", "--config", str(config), "--slurm", "--nnodes", "2", "--run-dir", str(tmp_path / "run"))
    assert code == 0, err
    assert "sbatch is not on PATH" in out
    script = (tmp_path / "run" / "launch" / "train.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and (tmp_path / "run" / "config.yaml").is_file()


def test_hostfile_command_and_validation(tmp_path, capsys):
    config = write_job(tmp_path / "prior.yaml", TINY_PRIOR)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=8\n# a comment\nnode-b slots=8\n")
    assert read_hostfile(hostfile) == [("node-a", 8), ("node-b", 8)]
    code, out, err = cli(capsys, "launch", "--config", str(config), "--hostfile", str(hostfile), "--dry-run", "--run-dir", str(tmp_path / "r"))
    assert code == 0, err
    assert "-m deepspeed.launcher.runner " in out and f"--hostfile={hostfile}" in out
    assert "--module launch.worker" in out and "--no_local_rank" in out
    hostfile.write_text("node-a 8\n")
    code, out, err = cli(capsys, "launch", "--config", str(config), "--hostfile", str(hostfile), "--dry-run")
    assert code == 2 and "expected 'HOST slots=N'" in err


def test_memory_plan_orders_zero_stages(tmp_path, capsys):
    config = write_job(tmp_path / "prior.yaml", merged(TINY_PRIOR, deepspeed={"precision": "bf16"}))
    code, out, err = cli(capsys, "launch", "--config", str(config), "--plan", "--gpus", "16", "--gpus-per-node", "8")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and len(line.split()) >= 7]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    totals = [float(r[6]) for r in rows]
    assert totals == sorted(totals, reverse=True)
    assert "16 GPU(s) on 2 node(s)" in out


def test_memory_plan_numbers():
    from trainer.memory_plan import ModelSize, zero_plan

    size = ModelSize(params=1_000_000_000, largest_layer=0, activations_bytes=None)
    # mixed precision: 2 + 2 + 16 bytes/param of model states; ZeRO-3 divides all by N; the
    # EMA (4 bytes/param) is always sharded
    assert zero_plan(size, 0, 64, "bf16").total == pytest.approx(20e9 + 4e9 / 64)
    assert zero_plan(size, 3, 64, "bf16").total == pytest.approx(24e9 / 64)
    assert zero_plan(size, 2, 8, "bf16").total == pytest.approx(2e9 + 22e9 / 8)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}, (3, 1, 8)),  # torchrun / DeepSpeed
        ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16"}, (5, 1, 16)),
        ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"}, (2, 0, 4)),
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, (1, 0, 2)),
        ({}, (0, 0, 1)),
        # torchrun inside an srun allocation: torchrun's own variables win
        ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "7", "SLURM_NTASKS": "8"}, (0, 0, 2)),
    ],
)
def test_rank_discovery(env, expected):
    info = world_info_from_env(env)
    assert (info.rank, info.local_rank, info.world_size) == expected


def test_rank_discovery_rejects_inconsistent_variables():
    with pytest.raises(ValueError, match="outside world size"):
        world_info_from_env({"RANK": "4", "WORLD_SIZE": "4"})


TRAINING_CONFIGS = sorted(
    str(p) for folder in ("configs/demo", "configs/paper", "configs/karlo") for p in __import__("pathlib").Path(folder).glob("*.yaml")
    if "precompute" not in p.name
)


@pytest.mark.parametrize("path", TRAINING_CONFIGS)
def test_shipped_training_configs_are_complete_jobs(path):
    from launch.config_files import load_config
    from trainer.engine import deepspeed_config

    job = load_config(path)
    assert job.name != "unclip" and job.data is not None, "every shipped job names itself and its data"
    ds = deepspeed_config(job, world_size=64, device="cuda:0")
    assert ds["train_batch_size"] == job.train.micro_batch_size * job.train.grad_accum * 64
