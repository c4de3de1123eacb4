"""End to end, side by side: `unclip train` against dalle2-pytorch's own trainers.

    .venv-bench/bin/python -m benchmarks.trainer_e2e [--quick]

One run (a) writes shapes shards and their CLIP embeddings once, in a temporary folder, with
`unclip shards` and `unclip precompute` (the random-weight `unclip-tiny-512` CLIP: 512-d
embeddings, text width 512, 77 tokens, the interface the matched sizes need; the weights do
not change the cost of training on its outputs); (b) trains the prior and the decoder at the
sizes of `benchmarks/specs.py`'s "quick" preset with `unclip train --nproc N` (our loader,
DeepSpeed engine, EMA and metrics; DS_ACCELERATOR=cpu, gloo), reading samples/s from the
run's metrics.jsonl after the warm-up steps; (c) trains dalle2-pytorch's `DiffusionPriorTrainer`
and `DecoderTrainer` on the same embeddings (and images) at the matched architectures
(`benchmarks/peer.py`), with their own accelerate (DDP over gloo, N processes via
torch.distributed.run) and EMA, in the loop their users write: `loss = trainer(...);
trainer.update()`; (d) times our bare model step (`benchmarks/ours.py`: forward + backward +
fused AdamW on fixed tensors, no loader, engine, EMA or metrics) in N concurrent processes,
which gives our trainer's overhead; (e) writes the section "End to end: the trainers" of
benchmarks/RESULTS.md.

Fairness, stated in the table's notes: their processes read batches from tensors held in
memory (decoded before timing), so their side pays nothing for data, ours pays its whole
loader; their EMA runs with ema-pytorch's defaults (every 10th step, a plain copy up to step 100),
ours every step. Both
favour them. Peak memory is each rank's lifetime high-water mark (ru_maxrss, imports and
data included) on both sides, the mean over the ranks.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from benchmarks.specs import PRESETS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
CLIP = "unclip-tiny-512"  # models/clip_configs/unclip-tiny-512.json
# "decoder-lite": the switchable option for the decoder row: the same UNet with self-attention at
# 16 and 8 px only (`model.unet.attention_resolutions: [16, 8]`, no attention over the 1024
# pixels at 32 px); theirs stays at the matched architecture, so its row is ours-switched
# against theirs-as-matched
KINDS = ("prior", "decoder", "decoder-lite")
LITE_ATTENTION = (16, 8)
TARGET_SPEEDUP = 1.5  # ours / theirs samples/s, both stages
TARGET_MEMORY = 1.0  # ours / theirs peak RSS per rank, at most
TARGET_OVERHEAD = 0.10  # our full step at most 10% slower than our bare model step
SECTION_BEGIN = "<!-- trainer_e2e: begin -->"
SECTION_END = "<!-- trainer_e2e: end -->"
INDEX_ROW = "| trainers end to end"
QUICK_NOTE = ("**These are `--quick` numbers**: a check that the chain runs, with a single round of a few "
              "timed steps each, which on a shared machine can move by 20% from run to run. The measurement "
              "is the command without `--quick`.")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How long each of the six measurements runs (steps per rank)."""

    name: str
    warmup: int  # untimed steps first: engine set-up, first FLOP count, allocator growth
    timed: int
    samples: int  # shapes images written (the loader cycles through them as epochs)
    nproc: int = 2


PLANS = {
    # a check that the whole chain runs (about 10 minutes on 2 loaded cores, mostly start-up)
    "quick": Plan("quick", warmup=1, timed=2, samples=128),
    # the measurement: 3 rounds (`--rounds`), about an hour on 2 loaded cores (a decoder step
    # takes ~20 s per rank there, a prior step ~12 s, and each of the 6 runs a minute to start)
    "full": Plan("full", warmup=2, timed=10, samples=1024),
}


@dataclasses.dataclass
class Measured:
    """One side's training of one stage: samples/s over all ranks, peak RSS per rank."""

    samples_per_s: float
    peak_rss_bytes: Optional[float]  # mean over ranks of the lifetime high-water mark
    step_s: float  # mean seconds per step (a rank's)
    data_wait_ratio: Optional[float] = None  # ours only: share of the step spent waiting on data
    note: str = ""


# ------------------------------------------------------------------------------ helpers


def _threads(nproc: int) -> int:
    """Intra-op threads per rank: the cores shared out, as our launcher does (OMP_NUM_THREADS)."""
    return max(1, (os.cpu_count() or 1) // nproc)


def _env(nproc: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(_threads(nproc)), DS_ACCELERATOR="cpu",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(cmd: list[str], env: dict[str, str], log: Callable[[str], None], timeout: float = 3600) -> str:
    """Run a child to completion; its stdout, or RuntimeError with the tail of its output."""
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {done.returncode}:\n{tail}")
    return done.stdout


def _unclip(*args: str) -> list[str]:
    return [sys.executable, "-m", "launch", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_bytes() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux


# ------------------------------------------------------------------------------ (a) data


def prepare(root: Path, plan: Plan, image_size: int, log: Callable[[str], None]) -> tuple[str, Path]:
    """Shapes shards at `image_size` px and their embeddings; (shard pattern, embeddings folder)."""
    shards, emb = root / "shards", root / "embeddings"
    per_shard = max(32, plan.samples // 8)  # several shards per rank: each rank reads its own
    env = _env(1)
    _run(_unclip("shards", "--source", "shapes", "--out", str(shards), "--count", str(plan.samples),
                 "--size", str(image_size), "--per-shard", str(per_shard), "--seed", "0"), env, log)
    count = len(json.loads((shards / "sizes.json").read_text()))
    pattern = str(shards / ("shard-{000000..%06d}.tar" % (count - 1)))
    _run(_unclip("precompute", "--config", str(ROOT / "configs/demo/precompute.yaml"), "--shards", pattern,
                 "--out", str(emb), "--set", f"clip.name={CLIP}", "--set", "clip.pretrained=null"), env, log)
    return pattern, emb


# ------------------------------------------------------------------------------ (b) ours


def our_job(kind: str, spec: Any, plan: Plan, pattern: str, emb: Path) -> dict:
    """The training job: our model at the spec (the very config the bare step builds), the
    trainer's usual settings, nothing that runs between steps (no checkpoints, validation or
    sample grids inside the timed window)."""
    from models.config import config_to_dict

    from benchmarks import ours

    stage = _stage(kind)
    model = ours.prior_config(spec) if stage == "prior" else ours.decoder_config(spec)
    data: dict[str, Any] = {"sources": [{"shards": pattern, "embeddings": str(emb)}], "num_workers": 0,
                            "shuffle_buffer": 256}
    if stage == "decoder":
        data["image_size"] = spec.image_size
    steps = plan.warmup + plan.timed
    return {
        "stage": stage, "name": f"e2e-{kind}", "model": config_to_dict(model), "clip": {"name": CLIP},
        "data": data,
        "train": {"steps": steps, "micro_batch_size": spec.batch, "grad_accum": 1, "seed": 0, "log_every": 1,
                  "ema_decay": 0.9999},
        "optim": {"lr": 1e-4, "weight_decay": 0.01, "warmup_steps": 0, "schedule": "constant", "grad_clip": 0.5},
        "deepspeed": {"zero_stage": 2, "precision": "fp32", "activation_checkpointing": False, "timeout_s": 600},
        "checkpoint": {"every_steps": 10 * steps, "keep_last": 1},
    }


def read_metrics(path: Path, warmup: int) -> Measured:
    """samples/s over the steps after `warmup`, from the wall clock between the records
    (log_every 1: one record per step, job-wide). Not from `unclip_step_time_seconds`: that
    times the loader and the engine but not the EMA update or the logging itself, which the
    full step includes."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    base = next((r for r in records if r["step"] == warmup), None)
    timed = [r for r in records if r["step"] > warmup]
    if base is None or not timed:
        raise RuntimeError(f"{path}: needs the record of step {warmup} and later ones")
    last = timed[-1]
    seconds = last["time"] - base["time"]
    samples = last["unclip_samples_total"] - base["unclip_samples_total"]  # summed over ranks
    waits = [r.get("unclip_data_wait_ratio", 0.0) for r in timed]
    world = last.get("unclip_world_size", 1)
    peak = last.get("unclip_memory_peak_bytes")  # summed over ranks by the metrics reducer
    return Measured(samples / seconds, peak / world if peak else None, seconds / (last["step"] - warmup),
                    statistics.mean(waits))


def run_ours(kind: str, spec: Any, plan: Plan, pattern: str, emb: Path, root: Path, n: int,
             log: Callable[[str], None]) -> Measured:
    config = root / f"ours-{kind}.yaml"
    config.write_text(yaml.safe_dump(our_job(kind, spec, plan, pattern, emb), sort_keys=False))
    run_dir = root / f"run-{kind}-{n}"  # a fresh run per round: metrics.jsonl is appended to
    _run(_unclip("train", "--config", str(config), "--run-dir", str(run_dir), "--nproc", str(plan.nproc),
                 "--no-resume"), _env(plan.nproc), log)
    return read_metrics(run_dir / "metrics.jsonl", plan.warmup)


# ------------------------------------------------------------------------------ (c) theirs


def _npy(data: bytes):
    import numpy as np

    return np.load(io.BytesIO(data))


def _tar_members(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {field: bytes} of one webdataset tar (`key.field` members)."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            if m.isfile():
                key, _, field = m.name.partition(".")
                out.setdefault(key, {})[field] = tar.extractfile(m).read()
    return out


def load_rank_data(kind: str, spec: Any, pattern_dir: Path, emb: Path, rank: int, world: int) -> dict:
    """This rank's share of the shards (shard i goes to rank i % world), as in-memory tensors
    shaped as their trainers take them: text encodings zero-padded to the spec's length (their
    models read all-zero rows as padding), images uint8 (converted per batch)."""
    import numpy as np
    import torch
    from PIL import Image

    image_embed, text_embed, encodings, images = [], [], [], []
    text_len = spec.text_len
    for i, shard in enumerate(sorted(emb.glob("*.tar"))):
        if i % world != rank:
            continue
        embs = _tar_members(shard)
        imgs = _tar_members(pattern_dir / shard.name) if kind == "decoder" else {}
        for key, f in embs.items():
            if "img_emb.npy" not in f:
                continue
            image_embed.append(_npy(f["img_emb.npy"]).astype(np.float32))
            text_embed.append(_npy(f["txt_emb.npy"]).astype(np.float32))
            enc = _npy(f["txt_enc.npy"]).astype(np.float32)[:text_len]
            encodings.append(np.pad(enc, ((0, text_len - enc.shape[0]), (0, 0))))
            if kind == "decoder":
                field = next(k for k in imgs[key] if k in ("jpg", "png", "webp", "jpeg"))
                img = Image.open(io.BytesIO(imgs[key][field])).convert("RGB").resize((spec.image_size,) * 2)
                images.append(np.asarray(img).transpose(2, 0, 1).copy())
    out = {"image_embed": torch.from_numpy(np.stack(image_embed)), "text_embed": torch.from_numpy(np.stack(text_embed)),
           "text_encodings": torch.from_numpy(np.stack(encodings))}
    if images:
        out["images"] = torch.from_numpy(np.stack(images))
    return out


def _peer_trainer(kind: str, spec: Any, accelerator: Any) -> Any:
    """Their trainer as their train_diffusion_prior.py / train_decoder.py build it, with their
    train configs' defaults (DiffusionPriorTrainConfig: lr 1.1e-4, wd 6.02e-2, grad norm 0.5,
    EMA beta 0.99; DecoderTrainConfig: lr 1e-4, wd 0.01, grad norm 0.5, EMA beta 0.999)."""
    from dalle2_pytorch.trainer import DecoderTrainer, DiffusionPriorTrainer

    from benchmarks import peer

    if kind == "prior":
        return DiffusionPriorTrainer(peer.prior_model(spec), accelerator=accelerator, lr=1.1e-4, wd=6.02e-2,
                                     max_grad_norm=0.5, use_ema=True, ema_beta=0.99)
    return DecoderTrainer(peer.decoder_model(spec), accelerator=accelerator, lr=1e-4, wd=0.01, max_grad_norm=0.5,
                          use_ema=True, ema_beta=0.999)


def peer_worker(args: argparse.Namespace) -> None:
    """One rank of their training (started by torch.distributed.run); writes its JSON result."""
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from benchmarks import peer

    peer.load()  # their sampling progress bars off; imports checked
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = _spec(args.kind)  # their side is always at the matched spec ("prior" or "decoder")
    # their conditioning drop (classifier-free guidance) leaves some parameters without a
    # gradient on some steps: DDP needs find_unused_parameters, as their scripts set
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    rank, world = accelerator.process_index, accelerator.num_processes
    data = load_rank_data(args.kind, spec, Path(args.shards), Path(args.embeddings), rank, world)
    trainer = _peer_trainer(args.kind, spec, accelerator)
    trainer.train()
    n, batch = len(data["image_embed"]), spec.batch
    gen = torch.Generator().manual_seed(rank)
    order, cursor, seconds = torch.randperm(n, generator=gen), 0, []
    for step in range(args.warmup + args.timed):
        if cursor + batch > n:  # next epoch, reshuffled, as their loaders do
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor:cursor + batch]
        cursor += batch
        start = time.perf_counter()
        if args.kind == "prior":
            trainer(text_embed=data["text_embed"][idx], image_embed=data["image_embed"][idx],
                    text_encodings=data["text_encodings"][idx])
            trainer.update()
        else:
            trainer(data["images"][idx].float() / 255.0, image_embed=data["image_embed"][idx],
                    text_encodings=data["text_encodings"][idx], unet_number=1)
            trainer.update(unet_number=1)
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
    result = {"rank": rank, "world": world, "samples": batch * len(seconds), "seconds": sum(seconds),
              "peak_rss_bytes": _peak_rss_bytes(), "threads": torch.get_num_threads(),
              "distributed": str(accelerator.distributed_type)}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))


def run_theirs(kind: str, plan: Plan, pattern: str, emb: Path, root: Path, n: int,
               log: Callable[[str], None]) -> Measured:
    out = root / f"theirs-{kind}-{n}"
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(plan.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "benchmarks.trainer_e2e", "--peer-worker", kind, "--shards", str(Path(pattern).parent),
           "--embeddings", str(emb), "--warmup", str(plan.warmup), "--timed", str(plan.timed), "--out-dir", str(out)]
    _run(cmd, _env(plan.nproc), log)
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    rate = sum(r["samples"] / r["seconds"] for r in ranks)  # the ranks run concurrently
    note = f"{len(ranks)} processes, {ranks[0]['distributed']}, {ranks[0]['threads']} thread(s) each"
    return Measured(rate, statistics.mean(r["peak_rss_bytes"] for r in ranks),
                    statistics.mean(r["seconds"] / plan.timed for r in ranks), note=note)


# ------------------------------------------------------------------------------ (d) bare


def bare_worker(args: argparse.Namespace) -> None:
    """Our bare model step in this process; prints one JSON line."""
    import torch

    from benchmarks import ours
    from benchmarks.runtime import Runtime

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
    spec = _spec(args.kind)
    bench = getattr(ours, f"build_{_stage(args.kind)}")(spec, Runtime.for_device("cpu"))
    seconds = []
    for step in range(args.warmup + args.timed):
        start = time.perf_counter()
        bench.train_step()
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
    print(json.dumps({"samples": spec.batch * len(seconds), "seconds": sum(seconds),
                      "peak_rss_bytes": _peak_rss_bytes()}), flush=True)


def run_bare(kind: str, plan: Plan, log: Callable[[str], None]) -> Measured:
    """The bare step in `nproc` concurrent processes with the trainer's threads per rank, so it
    sees the same share of the machine as each rank of the trainer."""
    cmd = [sys.executable, "-m", "benchmarks.trainer_e2e", "--bare-worker", kind, "--warmup", str(plan.warmup),
           "--timed", str(plan.timed)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(plan.nproc), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(plan.nproc)]
    results = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"bare {kind} step exited {p.returncode}: {err.strip().splitlines()[-1:]}")
        results.append(json.loads([line for line in out.splitlines() if line.startswith("{")][-1]))
    return Measured(sum(r["samples"] / r["seconds"] for r in results),
                    statistics.mean(r["peak_rss_bytes"] for r in results),
                    statistics.mean(r["seconds"] / plan.timed for r in results))


# ------------------------------------------------------------------------------ (e) report


def _median(runs: list[Measured]) -> Measured:
    """The run at the median samples/s (the lower middle one of an even count)."""
    return sorted(runs, key=lambda m: m.samples_per_s)[(len(runs) - 1) // 2]


def _stage(kind: str) -> str:
    """The stage a measured kind trains ("decoder-lite" is a decoder)."""
    return "prior" if kind == "prior" else "decoder"


def _spec(kind: str) -> Any:
    spec = getattr(PRESETS["quick"], _stage(kind))
    return dataclasses.replace(spec, attention_resolutions=LITE_ATTENTION) if kind == "decoder-lite" else spec


def _label(kind: str, spec: Any) -> str:
    if kind == "prior":
        return f"prior (dim {spec.dim}, depth {spec.depth}, {spec.text_len} tokens), micro-batch {spec.batch}"
    if kind == "decoder-lite":
        return (f"decoder, attention at {'/'.join(map(str, spec.attention_resolutions))} px only "
                f"(`model.unet.attention_resolutions`; theirs as matched), micro-batch {spec.batch}")
    return f"decoder ({spec.image_size} px, base {spec.base_channels}), micro-batch {spec.batch}"


def _met(ok: bool) -> str:
    return "met" if ok else "**below target**"


def round_ratios(runs: dict[str, list[Measured]]) -> list[str]:
    """Each round's ours/theirs and overhead, as "1.36x, +19%": the three runs of a round saw
    about the same load, so their spread is the measurement's noise."""
    return [f"{o.samples_per_s / t.samples_per_s:.2f}x, {b.samples_per_s / o.samples_per_s - 1:+.0%}"
            for o, t, b in zip(runs["ours"], runs["theirs"], runs["bare"])]


def section(results: dict[str, dict[str, Measured]], plan: Plan, command: str, wall_s: float,
            load: tuple[float, float], rounds: int = 1, per_round: Optional[dict[str, list[str]]] = None) -> list[str]:
    """The markdown of the section (between its markers, so reruns replace it); `per_round`:
    `round_ratios` of each stage."""
    from benchmarks import peer

    threads = _threads(plan.nproc)
    rows = [
        "| stage | ours `unclip train`, samples/s | dalle2-pytorch trainer, samples/s | ours / theirs | "
        "peak RSS per rank, ours / theirs (MiB) | ratio | our bare model step, samples/s | trainer overhead | "
        "our data wait |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, r in results.items():
        ours, theirs, bare = r["ours"], r["theirs"], r["bare"]
        speed = ours.samples_per_s / theirs.samples_per_s
        mem = ours.peak_rss_bytes / theirs.peak_rss_bytes if ours.peak_rss_bytes and theirs.peak_rss_bytes else None
        overhead = bare.samples_per_s / ours.samples_per_s - 1  # extra time per sample over the bare step
        rows.append(
            f"| {_label(kind, _spec(kind))} | {ours.samples_per_s:.3g} | {theirs.samples_per_s:.3g} | "
            f"**{speed:.2f}x** ({_met(speed >= TARGET_SPEEDUP)}) | "
            f"{(ours.peak_rss_bytes or 0) / 2**20:.0f} / {(theirs.peak_rss_bytes or 0) / 2**20:.0f} | "
            + (f"**{mem:.2f}** ({_met(mem <= TARGET_MEMORY)})" if mem else "-") + " | "
            f"{bare.samples_per_s:.3g} | **{overhead:+.0%}** ({_met(overhead <= TARGET_OVERHEAD)}) | "
            f"{(ours.data_wait_ratio or 0):.0%} |")
    note_theirs = next(iter(results.values()))["theirs"].note
    return [
        SECTION_BEGIN,
        '<a id="trainers"></a>',
        "## End to end: the trainers",
        "",
        f"Written by `{command}` on {time.strftime('%Y-%m-%d')}, in {wall_s:.0f} s (load average {load[0]:.1f} "
        f"before, {load[1]:.1f} after; the machine is shared, ratios are what the targets are about). "
        f"{plan.nproc} ranks on each side, {threads} torch thread(s) per rank, CPU fp32; {plan.warmup} warm-up "
        f"steps, then {plan.timed} timed steps per rank; {rounds} round(s) of ours, theirs, bare per stage, "
        f"the median run kept. Same shards (shapes, {plan.samples} images) and the same "
        f"precomputed embeddings ({CLIP}: 512-d, text width 512, 77 tokens) on both sides; the sizes are "
        "specs.py's (the models table above).",
        "",
        *([QUICK_NOTE, ""] if plan.name == "quick" else []),
        *rows,
        "",
        "Targets: ours / theirs >= 1.5x samples/s, peak memory <= theirs, our full step within 10% of our bare "
        "model step (overhead = bare samples/s / trainer samples/s - 1).",
        "",
        *(["Each round's ours / theirs and overhead (the table's are the median runs'): "
           + "; ".join(f"{kind} " + " | ".join(r) for kind, r in per_round.items()) + ".", ""]
          if per_round and rounds > 1 else []),
        "- Ours: `unclip train --nproc 2` (DeepSpeed ZeRO-2 over gloo, fp32 masters, EMA every step, metrics "
        "every step (log_every 1, more often than a real run logs), our loader with num_workers 0 decoding "
        "in the rank); samples/s from metrics.jsonl: samples over the wall clock between the record of the "
        "last warm-up step and the last one, so loader, engine, EMA and logging all count.",
        f"- Theirs: dalle2-pytorch {peer.version()} `DiffusionPriorTrainer` / `DecoderTrainer` with their train "
        f"configs' defaults, accelerate DDP ({note_theirs}, torch.distributed.run), EMA with ema-pytorch's "
        "defaults (every 10th step, and a plain copy of the weights up to step 100); their loop "
        "`trainer(...)` + `trainer.update()`, timed per step. Their batches come from tensors decoded into "
        "memory before timing: their side pays nothing for data loading, ours pays its loader. Both "
        "differences favour them.",
        "- Bare: our model step (`benchmarks/ours.py`: forward, backward, fused AdamW on fixed tensors) in "
        f"{plan.nproc} concurrent processes with the same threads each.",
        *(["- Decoder-lite: the switchable option for the decoder row, our same UNet with self-attention at "
            f"{'/'.join(map(str, LITE_ATTENTION))} px only (`--set model.unet.attention_resolutions=[16,8]`: no "
            "attention layer over the 1024 pixels at 32 px, where the paper's decoder has 5), against their "
            "trainer at the matched architecture (the decoder row's runs)."] if "decoder-lite" in results else []),
        "- Peak RSS: each rank's lifetime high-water mark (getrusage, imports and held data included; ours "
        "from metrics.jsonl's `unclip_memory_peak_bytes`), mean over the ranks. The models table's memory "
        "rows instead count the model step alone above a post-import baseline.",
        SECTION_END,
    ]


def write_results(lines: list[str], headline: str, command: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section and the index row; the rest of RESULTS.md stays."""
    text = path.read_text() if path.exists() else ""
    block = "\n".join(lines)
    if SECTION_BEGIN in text and SECTION_END in text:
        head, rest = text.split(SECTION_BEGIN, 1)
        text = head + block + rest.split(SECTION_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    row = f"{INDEX_ROW} | `{command}` | [below](#trainers) | {headline} |"
    lines_in = text.splitlines()
    has_row = any(line.startswith(INDEX_ROW) for line in lines_in)
    out = []
    for line in lines_in:
        if line.startswith(INDEX_ROW):
            line = row
        elif not has_row and line.startswith("| models vs dalle2-pytorch"):
            out.append(line)
            line = row  # first run: the index row goes under the models' row
        out.append(line)
    path.write_text("\n".join(out) + "\n")


def headline(results: dict[str, dict[str, Measured]]) -> str:
    parts = []
    for kind, r in results.items():
        speed = r["ours"].samples_per_s / r["theirs"].samples_per_s
        over = r["bare"].samples_per_s / r["ours"].samples_per_s - 1
        mem = (r["ours"].peak_rss_bytes or 0) / (r["theirs"].peak_rss_bytes or 1)
        parts.append(f"{kind} {speed:.2f}x, memory {mem:.2f}, overhead {over:+.0%}")
    return "ours/theirs trainers: " + "; ".join(parts) + " (targets >= 1.5x, <= 1, <= +10%)"


# ------------------------------------------------------------------------------ main


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trainer_e2e", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{PLANS['quick'].timed} timed steps (a check that it runs)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--rounds", type=int, help="rounds of (ours, theirs, bare) per stage; the median is kept "
                   "(default: 1 with --quick, 3 without)")
    p.add_argument("--out", type=Path, default=RESULTS, help="the RESULTS.md to update")
    p.add_argument("--no-write", action="store_true", help="print the section, write nothing")
    p.add_argument("--keep", type=Path, help="work in this folder (kept) instead of a temporary one")
    # internal: one rank of their trainer, one process of our bare step
    p.add_argument("--peer-worker", choices=("prior", "decoder"), help=argparse.SUPPRESS)
    p.add_argument("--bare-worker", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    p.add_argument("--embeddings", help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    p.add_argument("--timed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", dest="worker_out", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args(argv)
    if args.peer_worker:
        args.kind, args.out = args.peer_worker, args.worker_out
        peer_worker(args)
        return 0
    if args.bare_worker:
        args.kind = args.bare_worker
        bare_worker(args)
        return 0
    return measure(args)


def measure(args: argparse.Namespace) -> int:
    from benchmarks import peer

    if peer.load() is None:
        print("dalle2-pytorch is not installed: run `bash benchmarks/setup.sh` and use .venv-bench/bin/python")
        return 2
    plan = PLANS["quick" if args.quick else "full"]
    args.rounds = args.rounds or (1 if args.quick else 3)
    command = "python -m benchmarks.trainer_e2e" + (" --quick" if args.quick else "")
    log = lambda msg: print(f"[trainer_e2e {time.perf_counter() - t0:5.0f} s] {msg}", flush=True)  # noqa: E731
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="trainer_e2e-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        pattern, emb = prepare(root, plan, _spec("decoder").image_size, log)
        log(f"data ready: {plan.samples} images, embeddings in {emb}")
        results: dict[str, dict[str, Measured]] = {}
        per_round: dict[str, list[str]] = {}
        for kind in args.kinds:
            spec = _spec(kind)
            runs: dict[str, list[Measured]] = {"ours": [], "theirs": [], "bare": []}
            # one heavy measurement at a time (the sides never share the cores), in rounds of
            # ours, theirs, bare: a shared machine's load changes by the minute, and each round
            # exposes the three to about the same load
            # the lite row's theirs is the decoder row's (the same trainer at the matched spec)
            shared = results.get("decoder", {}).get("theirs") if kind == "decoder-lite" else None
            for n in range(args.rounds):
                runs["ours"].append(run_ours(kind, spec, plan, pattern, emb, root, n, log))
                runs["theirs"].append(shared or run_theirs(_stage(kind), plan, pattern, emb, root, n, log))
                runs["bare"].append(run_bare(kind, plan, log))
                rates = ", ".join(f"{side} {m[-1].samples_per_s:.3g}" for side, m in runs.items())
                log(f"{kind} round {n + 1}: {rates} samples/s")
            results[kind] = {side: _median(m) for side, m in runs.items()}
            per_round[kind] = round_ratios(runs)
    lines = section(results, plan, command, time.perf_counter() - t0, (load0, os.getloadavg()[0]), args.rounds,
                    per_round)
    print("\n".join(lines))
    if not args.no_write:
        write_results(lines, headline(results), command, args.out)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
