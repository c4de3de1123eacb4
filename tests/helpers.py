"""Shared by the trainer/launch tests: tiny job files and running `unclip train` as a user would."""

from __future__ import annotations

import json
import os
import signal
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

# 8 -> 16 px, no attention: the smallest upsampler whose loss falls within 10 steps
TINY_UPSAMPLER = {
    "stage": "upsampler",
    "name": "tiny-up",
    "model": {
        "lowres_size": 8, "image_size": 16,
        "unet": {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
                 "norm_groups": 4},
        "diffusion": {"timesteps": 100, "sample_steps": 10},
    },
    "optim": {"lr": 0.005, "schedule": "constant"},
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
    """Run the `unclip` CLI in a fresh process (as a user would), capturing its output.

    It runs in a session of its own: on a timeout the whole group (the launcher and every rank
    it started) is killed, so no orphaned rank keeps the machine busy after a failed test."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch", *args], env=env_for_tests(env), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=cwd, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(proc.args, timeout, output=out, stderr=err) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


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


def end_state(run_dir: Path, step: int, world: int) -> dict:
    """Everything a resume must reproduce at checkpoint `step`: the fp32 weights (consolidated by
    DeepSpeed's own tool) and every rank's EMA shard, under one dict ('ema<rank>/...' keys)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from trainer.safe_load import weights_only_loads

    with weights_only_loads():  # zero_to_fp32 would unpickle the shards; it works without
        state = dict(get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=f"step_{step:07d}"))
    for r in range(world):
        shard = load_file(run_dir / "checkpoints" / f"step_{step:07d}" / f"rank_{r:05d}.safetensors")
        state.update({f"ema{r}/{k}": v for k, v in shard.items()})
    return state


def differing(a: dict, b: dict) -> list[str]:
    """The keys whose tensors are not bit-identical (or that only one side has)."""
    import torch

    return sorted(set(a) ^ set(b)) + [k for k in sorted(set(a) & set(b)) if not torch.equal(a[k], b[k])]
