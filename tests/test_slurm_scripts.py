"""The sbatch scripts `unclip launch --slurm` and `unclip precompute --slurm` write: CPU and
GPU nodes, job arrays, and bad SLURM options refused before any work (dry runs, no SLURM
needed; tests/test_slurm_real.py runs them on a real cluster)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from launch.cli import main
from launch.slurm import time_limit_seconds
from tests.helpers import TINY_PRIOR, write_job

PRECOMPUTE = Path(__file__).resolve().parent.parent / "configs" / "demo" / "precompute.yaml"


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def valid_bash(script: str) -> bool:
    return subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_cpu_nodes_request_cpus_and_memory_and_no_gres(tmp_path, capsys):
    config = write_job(tmp_path / "prior.yaml", TINY_PRIOR)
    code, script, err = cli(
        capsys, "launch", "--config", str(config), "--slurm", "--gpus-per-node", "0", "--nproc", "4", "--nnodes", "2",
        "--cpus-per-task", "8", "--mem", "32G", "--time", "1-00:00:00", "--signal-lead", "600",
        "--run-dir", str(tmp_path / "run"), "--dry-run",
    )
    assert code == 0, err
    assert "gpus" not in script and "gres" not in script  # the request sbatch refused on CPU nodes
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G",
                 "#SBATCH --time=1-00:00:00", "#SBATCH --signal=B:USR1@600", "#SBATCH --requeue",
                 "export OMP_NUM_THREADS=2", "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600",
                 'scancel --signal=TERM "$SLURM_JOB_ID"', "--nproc-per-node=4", "--nnodes=2"):
        assert line in script, line
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--cpus-per-task=8" in srun  # a step does not inherit the job's CPUs since SLURM 22.05
    assert "kill -TERM" not in script  # srun would abort the step (SIGKILL) before the ranks save
    assert valid_bash(script) and not (tmp_path / "run").exists()


def test_gpu_nodes_keep_one_rank_per_gpu(tmp_path, capsys):
    config = write_job(tmp_path / "prior.yaml", TINY_PRIOR)
    code, script, err = cli(capsys, "launch", "--config", str(config), "--slurm", "--nnodes", "2",
                            "--run-dir", str(tmp_path / "run"), "--dry-run")
    assert code == 0, err
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=64", "export OMP_NUM_THREADS=8",
                 "--nproc-per-node=8", "#SBATCH --signal=B:USR1@300"):
        assert line in script, line
    assert "--mem" not in script and valid_bash(script)


@pytest.mark.parametrize("args, message", [
    (["--nproc", "2"], "one rank per GPU"),
    (["--gpus-per-node", "0", "--nproc", "0"], "--nproc (ranks per node) must be >= 1"),
    (["--gpus-per-node", "-1"], "--gpus-per-node (-1) >= 0"),
    (["--time", "5"], "--signal-lead 300 s must be > 0 and shorter than --time 5"),
    (["--time", "90 minutes"], "expected MM, MM:SS, HH:MM:SS"),
    (["--mem", "4 GB"], "--mem '4 GB': expected a size"),
    (["--cpus-per-task", "0"], "--cpus-per-task must be >= 1"),
])
def test_bad_slurm_options_exit_2_before_any_work(tmp_path, capsys, args, message):
    config = write_job(tmp_path / "prior.yaml", TINY_PRIOR)
    code, _, err = cli(capsys, "launch", "--config", str(config), "--slurm", "--run-dir", str(tmp_path / "run"), *args)
    assert code == 2 and message in err, err
    assert not (tmp_path / "run").exists()


def test_nproc_with_a_hostfile_is_refused(tmp_path, capsys):
    config = write_job(tmp_path / "prior.yaml", TINY_PRIOR)
    (tmp_path / "hosts").write_text("a slots=2\n")
    code, _, err = cli(capsys, "launch", "--config", str(config), "--hostfile", str(tmp_path / "hosts"), "--nproc", "2",
                       "--run-dir", str(tmp_path / "run"))
    assert code == 2 and "slots=N set the ranks" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, seconds", [
    ("90", 5400), ("5:30", 330), ("01:02:03", 3723), ("2-12", 2 * 86400 + 12 * 3600),
    ("1-00:30", 86400 + 1800), ("1-02:03:04", 93784), ("INFINITE", None), ("unlimited", None),
])
def test_time_limit_forms_of_sbatch(text, seconds):
    assert time_limit_seconds(text) == seconds


def test_precompute_array_script(tmp_path, capsys):
    pattern = str(tmp_path / "shard-{000000..000003}.tar")
    code, script, err = cli(
        capsys, "precompute", "--config", str(PRECOMPUTE), "--shards", pattern, "--out", str(tmp_path / "emb"),
        "--set", "batch_size=8", "--slurm", "--array", "4", "--cpus-per-task", "4", "--gpus-per-task", "1",
        "--mem", "16G", "--partition", "gpu", "--slurm-dir", str(tmp_path / "slurm"), "--dry-run",
    )
    assert code == 0, err
    for line in ("#SBATCH --array=0-3", "#SBATCH --ntasks=1", "#SBATCH --cpus-per-task=4", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --mem=16G", "#SBATCH --partition=gpu", "#SBATCH --requeue",
                 f"#SBATCH --output={tmp_path / 'slurm'}/unclip-precompute-%A_%a.out", "export OMP_NUM_THREADS=4"):
        assert line in script, line
    task = next(line for line in script.splitlines() if line.startswith("exec "))
    for arg in ("-m launch precompute", f"--config {PRECOMPUTE}", f"'{pattern}'", "--set batch_size=8",
                '--rank "$SLURM_ARRAY_TASK_ID" --world-size 4'):
        assert arg in task, arg
    assert valid_bash(script) and not (tmp_path / "slurm").exists()


@pytest.mark.parametrize("args, message", [
    (["--slurm"], "--slurm needs --array N"),
    (["--slurm", "--array", "5"], "only 4 shard(s)"),
    (["--slurm", "--array", "2", "--rank", "0", "--world-size", "2"], "each array task's rank is its task index"),
    (["--array", "2"], "--array and --dry-run go with --slurm"),
    (["--slurm", "--array", "2", "--time", "soon"], "--time 'soon'"),
])
def test_bad_precompute_array_options_exit_2(tmp_path, capsys, args, message):
    pattern = str(tmp_path / "shard-{000000..000003}.tar")
    code, _, err = cli(capsys, "precompute", "--config", str(PRECOMPUTE), "--shards", pattern,
                       "--out", str(tmp_path / "emb"), "--slurm-dir", str(tmp_path / "slurm"), *args)
    assert code == 2 and message in err, err
    assert not (tmp_path / "slurm").exists() and not (tmp_path / "emb").exists()
