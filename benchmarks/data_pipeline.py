"""Data pipeline overhead, side by side (writes benchmarks/RESULTS_data_pipeline.md).

1. Loader: samples/s of `build_loader` (tar streaming, shuffle, decode, resize to 64 px,
   collate) against the raw rate of the same decode+resize in one plain loop over the same
   image bytes held in memory.
2. Precompute: samples/s of `run_precompute` (streaming, decoding, CLIP forward, fp16 .npy
   writing) against a plain open_clip forward loop (`encode_image` + `encode_text`) over the
   same batches, already decoded and on the device.

Target: ratio >= 0.9 in both (pipeline overhead under 10%).

    python benchmarks/data_pipeline.py                       # CPU, quick
    python benchmarks/data_pipeline.py --model ViT-B-32 --device cuda --images 4096 --workers 8
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline.config import DataConfig, PrecomputeConfig, SourceConfig  # noqa: E402
from data_pipeline.decode import decode_image, open_image  # noqa: E402
from data_pipeline.precompute import run_precompute  # noqa: E402
from data_pipeline.shapes import generate  # noqa: E402
from data_pipeline.stream import build_loader  # noqa: E402
from data_pipeline.tario import TarWriter  # noqa: E402
from models.clip import ClipConfig, load_clip  # noqa: E402
from models.images import resize_center_crop  # noqa: E402


def make_images(count: int, size: int) -> list[tuple[str, bytes, str]]:
    """Photo-like JPEGs: a shapes image with smooth colour fields and noise, so decoding costs
    what a real photo of that size costs (flat colours decode unrealistically fast)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for key, img, caption, _ in generate(count, size=size, seed=0):
        arr = np.asarray(img, dtype=np.float32)
        phase = rng.uniform(0, 6.28, 3)
        field = 60 * np.sin(6 * xx[..., None] + 4 * yy[..., None] + phase)
        arr = np.clip(arr + field + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append((key, buf.getvalue(), caption))
    return out


def write(images, folder: str, per_shard: int) -> list[str]:
    urls = []
    for start in range(0, len(images), per_shard):
        url = os.path.join(folder, f"shard-{start // per_shard:06d}.tar")
        with TarWriter(url) as w:
            for key, data, caption in images[start : start + per_shard]:
                w.write(key, {"jpg": data, "txt": caption.encode()})
        urls.append(url)
    return urls


def bench_loader(images, shards, workers: int, size: int, batch: int, repeats: int) -> dict[str, float]:
    """Steady-state rates: the clock starts when the first batch arrives, so worker start-up
    (paid once per run in resampled mode, once per epoch otherwise) is reported apart."""
    best = {"raw": 0.0, "loader": 0.0, "inproc": 0.0, "startup": float("inf")}
    for _ in range(repeats):
        t = time.perf_counter()
        for _key, data, _caption in images[batch:]:  # the plain loop: decode + resize, nothing else
            np.asarray(resize_center_crop(open_image(data, draft_size=size), size))
        best["raw"] = max(best["raw"], (len(images) - batch) / (time.perf_counter() - t))
        for n_workers in (workers, 0):
            cfg = DataConfig(sources=[SourceConfig(shards=shards)], resampled=False, shuffle_buffer=256,
                             num_workers=n_workers, image_size=size)
            loader = build_loader(cfg, batch_size=batch, want={"image", "caption"})
            t0 = time.perf_counter()
            it = iter(loader)
            n = len(next(it)["key"])
            t1 = time.perf_counter()
            rest = sum(len(b["key"]) for b in it)
            rate = rest / (time.perf_counter() - t1)
            assert n + rest == len(images), (n + rest, len(images))
            if n_workers:
                best["loader"] = max(best["loader"], rate)
                best["startup"] = min(best["startup"], t1 - t0)
            else:
                best["inproc"] = max(best["inproc"], rate)
    return best


def bench_precompute(images, shards, model: str, device: str, batch: int, workers: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    clip = load_clip(model, device=device)
    size = clip.image_size
    tensors = [decode_image(data, size) for _k, data, _c in images]
    captions = [c for _k, _d, c in images]
    batches = [(torch.stack(tensors[i : i + batch]).to(device), clip.tokenize(captions[i : i + batch]).to(device))
               for i in range(0, len(images), batch)]
    mean = torch.tensor(clip.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(clip.std, device=device).view(1, 3, 1, 1)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    best_plain = best_job = 0.0
    with torch.no_grad():
        for pixels, tokens in batches[:2]:  # warm-up (kernels, allocator)
            clip.model.encode_image((pixels + 1) / 2 - mean)
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            for pixels, tokens in batches:
                clip.model.encode_image(((pixels + 1) / 2 - mean) / std, normalize=True)
                clip.model.encode_text(tokens, normalize=True)
        sync()
        best_plain = max(best_plain, len(images) / (time.perf_counter() - t))
        with tempfile.TemporaryDirectory() as out:
            cfg = PrecomputeConfig(clip=ClipConfig(name=model), batch_size=batch, num_workers=workers,
                                   text_encodings=False, device=device)
            t = time.perf_counter()
            summary = run_precompute(cfg, shards=shards, out=out, clip=clip, progress=False)
            sync()
            assert summary.samples == len(images)
            best_job = max(best_job, len(images) / (time.perf_counter() - t))
    return {"plain": best_plain, "job": best_job, "image_size": size}


def _fmt(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.2f}"


HEADER = """# Data pipeline benchmark results

Written by `benchmarks/data_pipeline.py`; newest first. Ratio = pipeline samples/s divided by
baseline samples/s; the target is >= 0.9 (under 10% overhead).

- Loader: the baseline is the decode + resize work alone, in one plain loop over the same
  JPEG bytes held in memory. The loader adds tar streaming, block shuffling, batching and
  (with workers) inter-process transfer, and gets a second process. Rates are steady-state
  (the clock starts at the first batch); worker start-up is shown separately. Runs with few
  images (256) are dominated by noise: read the 4096-image runs.
- Precompute: the baseline is the CLIP forward alone (`encode_image` + `encode_text`) on
  batches already decoded and tokenised. The job additionally decodes every JPEG, tokenises
  and writes fp16 shards. With a real CLIP (ViT-B-32 here) the forward dominates and the
  overhead disappears (ratio 1.00). With the ~150K-parameter demo CLIP at 32 px, the forward
  costs less than decoding a 256 px JPEG, so on a 2-core machine the job is bound by
  decoding (ratio ~0.37): the target holds for real models, not for the toy one, whose whole
  demo precompute takes seconds anyway.
- These runs are on a 2-core machine shared with other jobs (load average noted per run);
  torch is pinned to 1 thread so that oversubscribed OpenMP spinning does not swamp the
  measurement. No GPU was lent to this task, so no GPU figure is given.

"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--source-size", type=int, default=256, help="side of the JPEGs in the shards")
    p.add_argument("--size", type=int, default=64, help="loader output resolution")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--model", default="unclip-tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precompute-workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in the main process (on a small shared CPU box, more threads than "
                        "free cores make torch's kernels spin and the timings meaningless)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_data_pipeline.md"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images = make_images(args.images, args.source_size)
    with tempfile.TemporaryDirectory() as folder:
        shards = write(images, folder, per_shard=128)
        loader = bench_loader(images, shards, args.workers, args.size, args.batch, args.repeats)
        pre = bench_precompute(images, shards, args.model, args.device, args.batch, args.precompute_workers,
                               args.repeats)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    rows = [
        f"| loader, {args.workers} workers, {args.source_size} px JPEG -> {args.size} px (first batch after "
        f"{loader['startup']:.2f} s) | {loader['loader']:.0f} | "
        f"raw decode+resize loop: {loader['raw']:.0f} | **{loader['loader'] / loader['raw']:.2f}** |",
        f"| loader in-process (0 workers) | {loader['inproc']:.0f} | raw decode+resize loop: {loader['raw']:.0f} | "
        f"{loader['inproc'] / loader['raw']:.2f} |",
        f"| precompute `{args.model}` ({pre['image_size']} px) on {args.device}, {args.precompute_workers} worker(s) | "
        f"{_fmt(pre['job'])} | plain open_clip forward loop: {_fmt(pre['plain'])} | **{pre['job'] / pre['plain']:.2f}** |",
    ]
    text = "\n".join([
        f"### `python benchmarks/data_pipeline.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"{args.images} images, batch {args.batch}, best of {args.repeats} (interleaved); {os.cpu_count()} CPU cores "
        f"(load average before: {os.getloadavg()[0]:.1f}); torch threads {args.threads}; device: {device}; "
        f"torch {torch.__version__}.",
        "",
        "| measurement | samples/s | baseline samples/s | ratio (target >= 0.9) |",
        "| --- | ---: | --- | ---: |",
        *rows,
        "",
    ])
    print(text)
    header = HEADER
    old = open(args.out).read().removeprefix(header) if os.path.exists(args.out) else ""
    with open(args.out, "w") as f:
        f.write(header + text + "\n" + old)


if __name__ == "__main__":
    main()
