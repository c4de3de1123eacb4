"""Shared by the trainer/launch tests: tiny job files and running `unclip train` as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

# A few thousand parameters each: every multi-process test is dominated by start-up.
TINY_PRIOR = {
    "stage": "prior",
    "name": "tiny-prior",
    "model": {
        "kind": "diffusion", "embed_dim": 16, "text_width": 8, "max_text_len": 4, "dim": 32, "depth": 1,
        "heads": 2, "dim_head": 8, "ff_mult": 2, "diffusion": {"timesteps": 100, "sample_steps": 10},
    },
    "train": {"steps": 40, "micro_batch_size": 32, "log_every": 1, "seed": 0},
    "optim": {"lr": 0.01, "warmup_steps": 0, "schedule": "constant"},
    "deepspeed": {"zero_stage": 2, "timeout_s": 60},
    "checkpoint": {"every_steps": 10, "keep_last": 10},
}

TINY_DECODER = {
    "stage": "decoder",
    "name": "tiny-decoder",
    "model": {
        "image_size": 8, "image_embed_dim": 8, "text_width": 8, "max_text_len": 4, "context_dim": 16,
        "unet": {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
                 "head_channels": 8, "norm_groups": 4},
        "diffusion": {"timesteps": 100, "sample_steps": 10},
    },
    "train": {"steps": 8, "micro_batch_size": 4, "log_every": 1, "seed": 0},
    "optim": {"lr": 0.005, "warmup_steps": 0, "schedule": "constant"},
    "deepspeed": {"zero_stage": 3, "timeout_s": 60},
    "checkpoint": {"every_steps": 4, "keep_last": 2},
}


def merged(base: dict, **sections: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in sections.items():
        if isinstance(value, dict):
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out


def write_job(path: Path, job: dict) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def env_for_tests(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNCLIP_FAULT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def unclip(*args: str, env: Optional[dict[str, str]] = None, timeout: float = 300, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run the `unclip` CLI in a fresh process (as a user would), capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "launch", *args], env=env_for_tests(env), capture_output=True, text=True,
        timeout=timeout, cwd=cwd,
    )


def train(config: Path, run_dir: Path, *extra: str, nproc: int = 2, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    return unclip("train", "--config", str(config), "--run-dir", str(run_dir), "--nproc", str(nproc), *extra, env=env)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> job-mean loss, from RUN_DIR/metrics.jsonl (the last record of each step wins)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "unclip_loss" in record:
            out[record["step"]] = record["unclip_loss"]
    return out


def latest_step(run_dir: Path) -> int:
    name = (run_dir / "checkpoints" / "latest").read_text().strip()
    return int(name.removeprefix("step_"))


def mean_loss(loss: dict[int, float], steps) -> float:
    steps = list(steps)
    return sum(loss[s] for s in steps) / len(steps)


def explain(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-5000:]}"
