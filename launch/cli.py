"""`unclip`: the command line. Thin by design: parse, validate, hand over to one function.

Exit codes (contract): 0 success, 2 bad usage or a bad config (before any work), 1 a failure
at run time.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Optional, Sequence

from models.config import ConfigError

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2

# command -> "module:function" taking the parsed args and returning an exit code;
# resolved lazily so `unclip --help` does not import torch.
HANDLERS: dict[str, str] = {
    "demo": "launch.demo.run:main",
    "precompute": "launch.precompute_cmd:main",
    "shards": "launch.shards_cmd:main",
    "train": "launch.train_cmd:main",
    "export": "launch.export_cmd:main",
    "import": "launch.import_cmd:main",
    "sample": "launch.sample_cmd:main",
    "launch": "launch.launch_cmd:main",
    "report": "launch.report_cmd:main",
    "check": "launch.check_cmd:main",
}


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.steps=100 (repeatable; VALUE is YAML data)",
    )


def _add_metrics(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (rank 0)")
    p.add_argument("--metrics-host", default=None, help="address to bind the metrics server (default 127.0.0.1)")
    p.add_argument("--pushgateway", metavar="URL", help="push metrics to a Prometheus Pushgateway instead")


def _add_slurm(p: argparse.ArgumentParser, cpus: str) -> None:
    p.add_argument("--time", default="24:00:00", metavar="T", help="SLURM: time limit (MM, HH:MM:SS, D-HH:MM:SS)")
    p.add_argument("--partition", metavar="P", help="SLURM: partition")
    p.add_argument("--account", metavar="A", help="SLURM: account")
    p.add_argument("--cpus-per-task", type=int, metavar="C", help=f"SLURM: CPUs per task ({cpus})")
    p.add_argument("--mem", metavar="SIZE", help="SLURM: memory per task, e.g. 64G (sbatch --mem; default: the partition's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unclip",
        description="Train DALL-E 2 (unCLIP): shards -> CLIP precompute -> prior, decoder, upsamplers -> sample.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="run the whole pipeline end to end on the embedded shapes data")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="run root (re-running resumes)")
    p.add_argument("--quick", action="store_true", help="smallest preset (a few minutes; used by the tests)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="training and sampling seed of every stage (one seed per --out)")

    p = sub.add_parser("shards", help="write webdataset shards from images+captions or the shapes dataset")
    p.add_argument("--source", required=True, help="shapes | folder:DIR | table:FILE.csv | table:FILE.parquet")
    p.add_argument("--out", required=True, metavar="URL", help="output folder (any fsspec URL)")
    p.add_argument("--per-shard", type=int, default=1000, metavar="N", help="samples per shard")
    p.add_argument("--count", type=int, metavar="N", help="number of samples (shapes: required size of the set)")
    p.add_argument("--size", type=int, metavar="PX", help="image size (shapes: render size; others: resize)")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--format", dest="image_format", choices=["jpg", "png", "webp"],
                   help="re-encode format (default: png for shapes, jpg otherwise)")
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")
    p.add_argument("--min-size", type=int, default=0, metavar="PX", help="skip images smaller than this")

    p = sub.add_parser("precompute", help="CLIP embeddings for every shard (resumable, distributed)")
    p.add_argument("--config", required=True, metavar="FILE")
    p.add_argument("--shards", metavar="URL", help="input shards (overrides the config)")
    p.add_argument("--out", metavar="URL", help="embedding shards folder (overrides the config)")
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="local processes")
    p.add_argument("--rank", type=int, help="this job's index in a job array")
    p.add_argument("--world-size", type=int, help="size of the job array")
    p.add_argument("--format", choices=["webdataset", "clip-retrieval"],
                   help="clip-retrieval: also write img_emb/, text_emb/, metadata/ (clip-retrieval's layout)")
    p.add_argument("--slurm", action="store_true", help="submit a SLURM job array (with --array N) instead")
    p.add_argument("--array", type=int, metavar="N", help="SLURM: N tasks, each embeds shards[i::N]")
    p.add_argument("--gpus-per-task", type=int, default=0, metavar="G", help="SLURM: GPUs per task")
    p.add_argument("--slurm-dir", default="slurm", metavar="DIR", help="SLURM: where the script and task logs go")
    p.add_argument("--dry-run", action="store_true", help="with --slurm: print the script, submit nothing")
    _add_slurm(p, "default 1")
    _add_overrides(p)
    _add_metrics(p)

    p = sub.add_parser("train", help="train one stage (clip, prior, decoder, upsampler) with DeepSpeed")
    p.add_argument("--config", required=True, metavar="FILE")
    p.add_argument("--run-dir", metavar="DIR", help="run directory (default runs/<name>)")
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="local ranks")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the run has checkpoints")
    p.add_argument("--init-from", metavar="WEIGHTS",
                   help="initial weights of a fresh run: an export file (e.g. from `unclip import`) or a run dir; "
                        "ignored once the run has a checkpoint of its own")
    _add_overrides(p)
    _add_metrics(p)

    p = sub.add_parser("sample", help="text->image, variations, interpolation, text diffs")
    p.add_argument("--weights", nargs="+", required=True, metavar="PATH",
                   help="exported weights (paths or URLs: s3://...), run directories, or a folder of them "
                        "(the demo's output folder, a run root)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", metavar="TEXT")
    mode.add_argument("--prompts", metavar="FILE", help="one prompt per line")
    mode.add_argument("--variations", metavar="IMG")
    mode.add_argument("--interpolate", nargs=2, metavar=("IMG_A", "IMG_B"))
    mode.add_argument("--text-diff", metavar="IMG")
    p.add_argument("--from", dest="from_text", metavar="TEXT", help="with --text-diff")
    p.add_argument("--to", dest="to_text", metavar="TEXT", help="with --text-diff")
    p.add_argument("--frames", type=int, default=8, help="with --interpolate")
    p.add_argument("-n", type=int, default=1, help="images per prompt (variations per image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="DIR")
    where = p.add_argument_group("where it runs")
    where.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    where.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                       help="auto: bf16 autocast on CUDA, fp32 on CPU")
    where.add_argument("--clip", metavar="NAME", help="a pretrained open_clip model instead of a clip stage's weights")
    where.add_argument("--clip-pretrained", metavar="TAG|FILE", help="with --clip: an open_clip tag or a local weights file")
    prior = p.add_argument_group("prior (text->image; unset: its config)")
    prior.add_argument("--prior-guidance", type=float, metavar="G", help="classifier-free guidance scale")
    prior.add_argument("--prior-steps", type=int, metavar="N", help="diffusion prior: sampling steps")
    prior.add_argument("--prior-sampler", choices=["ddim", "ddpm"], help="diffusion prior: sampler")
    prior.add_argument("--temperature", type=float, metavar="T", help="autoregressive prior: 0 is greedy")
    prior.add_argument("--top-k", type=int, metavar="K", help="autoregressive prior: sample from the K likeliest codes")
    decoder = p.add_argument_group("decoder and upsamplers (unset: their configs)")
    decoder.add_argument("--guidance", type=float, metavar="G", help="decoder classifier-free guidance scale")
    decoder.add_argument("--steps", type=int, metavar="N", help="decoder sampling steps")
    decoder.add_argument("--sampler", choices=["ddim", "ddpm"], help="decoder sampler")
    decoder.add_argument("--upsampler-steps", type=int, nargs="+", metavar="N", help="one for all, or one per upsampler")
    decoder.add_argument("--upsampler-noise-level", type=float, nargs="+", metavar="L",
                         help="noise augmentation level of the low-res input, 0..1 (upsamplers trained with noise_aug)")

    p = sub.add_parser("export", help="consolidated EMA weights of runs (safetensors), or a diffusers unCLIP folder")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories (their latest checkpoint); with --format diffusers also export files")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="unclip: the file, or with several RUN_DIRs a folder of RUN_DIR_NAME.safetensors; "
                        "diffusers: the pipeline folder")
    p.add_argument("--format", dest="export_format", choices=["unclip", "diffusers"], default="unclip",
                   help="diffusers: one UnCLIPPipeline folder from a prior, a decoder and an upsampler "
                        "(and a clip, or the CLIP their configs name)")

    p = sub.add_parser("import", help="released weights in diffusers' unCLIP layout (Karlo's) -> unclip stage weights")
    p.add_argument("--from", dest="source_format", required=True, choices=["diffusers"], help="the folder's layout")
    p.add_argument("folder", metavar="DIR", help="an UnCLIPPipeline folder (model_index.json, prior/, decoder/, ...)")
    p.add_argument("--out", required=True, metavar="WEIGHTS_DIR",
                   help="new folder: <stage>.safetensors (export files) and <stage>.yaml (job configs)")
    p.add_argument("--configs", metavar="DIR",
                   help="stage configs supplying what the folder does not say (default: configs/karlo)")
    _add_overrides(p)

    p = sub.add_parser("launch", help="start a job locally, on a DeepSpeed hostfile, under torchrun or SLURM")
    p.add_argument("--config", required=True, metavar="FILE")
    p.add_argument("--nproc", type=int, metavar="N", help="local processes; ranks per node (torchrun, SLURM CPU nodes)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hostfile", metavar="F", help="DeepSpeed hostfile")
    where.add_argument("--slurm", action="store_true",
                       help="write and submit an sbatch script (GPU nodes; CPU nodes with --gpus-per-node 0 --nproc N)")
    p.add_argument("--nnodes", type=int, metavar="N", help="torchrun: number of nodes")
    p.add_argument("--node-rank", type=int, metavar="R", help="torchrun: this node's rank")
    p.add_argument("--master-addr", metavar="A", help="torchrun: rendezvous host")
    p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    p.add_argument("--plan", action="store_true", help="print per-GPU memory under ZeRO 0-3")
    p.add_argument("--gpus", type=int, metavar="N", help="with --plan: total GPUs")
    p.add_argument("--run-dir", metavar="DIR", help="run directory (default runs/<name>)")
    p.add_argument("--master-port", type=int, default=29500, metavar="P", help="torchrun/SLURM/hostfile: rendezvous port")
    p.add_argument("--gpus-per-node", type=int, default=8, metavar="G", help="SLURM and --plan: GPUs per node (SLURM: 0 = CPU nodes)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB", help="with --plan: memory per GPU")
    p.add_argument("--signal-lead", type=int, default=300, metavar="S",
                   help="SLURM: checkpoint and requeue S seconds before the time limit")
    _add_slurm(p, "one task per node runs its ranks; default 8 per GPU, 1 per CPU rank")
    _add_overrides(p)

    p = sub.add_parser("check", help="preflight: data reachable and counted, embeddings aligned, CLIP widths (exit 2)")
    p.add_argument("--config", required=True, action="append", metavar="FILE",
                   help="a job file (repeatable: the jobs of one pipeline are also checked against each other)")
    p.add_argument("--world-size", type=int, metavar="N", help="ranks the job will run on (default: from the launcher's "
                   "environment, else 1)")
    p.add_argument("--no-data", action="store_true", help="check the configs only, not the data they point at")
    _add_overrides(p)

    p = sub.add_parser("report", help="loss and throughput curves of a run, as a PNG")
    p.add_argument("run_dir", metavar="RUN_DIR")
    return parser


def _not_implemented(command: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        if getattr(args, "config", None):
            from launch.config_files import load_config

            load_config(args.config, args.overrides)  # a bad config still fails first, with exit 2
        print(f"unclip {command}: not implemented yet", file=sys.stderr)
        return EXIT_RUNTIME

    return handler


def _handler(command: str) -> Callable[[argparse.Namespace], int]:
    target = HANDLERS.get(command)
    if target is None:
        return _not_implemented(command)
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_handler(args.command)(args) or EXIT_OK)
    except ConfigError as err:
        print(f"unclip {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"unclip {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
