"""`unclip demo`: the whole pipeline on the embedded shapes data, each stage its own job.

    shards -> train CLIP -> precompute embeddings -> train prior -> train decoder (32 px)
           -> train upsampler (32 -> 64 px) -> sample + report

Every stage runs as a separate `unclip` process with the same configs and launcher a cluster
user would use (2 local ranks, DeepSpeed on CPU), so the demo exercises the real system.
A stage whose output already exists is skipped, so re-running resumes; training stages also
resume from their own checkpoints. `--seed S` trains every stage with seed S (initialisation,
data order, diffusion noise) on the same data set and samples the report with it; a run root
belongs to one seed and preset (`demo.json`), so re-running with others is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from launch.cli import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one demo run: samples in the data set, optimizer steps per training stage, and
    the typical seconds of each stage on 2 idle CPU cores (for the ETA)."""

    samples: int
    image_size: int
    steps: dict[str, int]
    expected_s: dict[str, float]
    eval_prompts: int  # fully specified held-out prompts
    open_samples: int  # samples per open shape-only prompt (launch/demo/report.py)
    binding_prompts: int  # two-object prompts
    nproc: int = 2


PRESETS = {
    "full": Preset(
        samples=8000, image_size=64, eval_prompts=64, open_samples=24, binding_prompts=32,
        steps={"clip": 200, "prior": 1500, "decoder": 1800, "upsampler": 1000},
        expected_s={"shards": 28, "clip": 40, "export": 2, "precompute": 9, "prior": 195, "decoder": 380,
                    "upsampler": 125, "report": 80},
    ),
    "quick": Preset(
        samples=512, image_size=64, eval_prompts=8, open_samples=2, binding_prompts=4,
        steps={"clip": 20, "prior": 20, "decoder": 20, "upsampler": 10},
        expected_s={"shards": 4, "clip": 17, "export": 2, "precompute": 9, "prior": 15, "decoder": 17,
                    "upsampler": 15, "report": 12},
    ),
}


@dataclasses.dataclass
class Stage:
    name: str
    done: Callable[[], bool]
    argv: Callable[[], list[str]]
    expected_s: float  # typical duration on 2 CPU cores, for the ETA
    progress_file: Optional[Path] = None  # metrics.jsonl of a training stage
    total_steps: int = 0


def _unclip(*args: str) -> list[str]:
    return [sys.executable, "-m", "launch", *args]


def _shard_pattern(shards: Path) -> str:
    sizes = json.loads((shards / "sizes.json").read_text())
    return str(shards / ("shard-{000000..%06d}.tar" % (len(sizes) - 1)))


class Demo:
    def __init__(self, root: Path, preset: Preset, seed: int = 0) -> None:
        self.root, self.preset, self.seed = root, preset, seed
        self.data = root / "data" / "shapes"
        self.embeddings = root / "embeddings"
        self.weights = root / "weights"
        self.runs = root / "runs"
        self.logs = root / "logs"

    def weight(self, stage: str) -> Path:
        return self.weights / f"{stage}.safetensors"

    def _data(self, embeddings: Optional[Path] = None) -> str:
        """`--set` value pointing a job at the demo shards (and their embeddings)."""
        source = {"shards": _shard_pattern(self.data)}
        if embeddings is not None:
            source["embeddings"] = str(embeddings)
        return "data.sources=" + json.dumps([source])

    def _train(self, stage: str, config: str, sets: Callable[[], list[str]]) -> Stage:
        """Train `stage` with its demo config; done once its run holds a checkpoint at the last step."""
        run_dir, steps = self.runs / stage, self.preset.steps[stage]

        def argv() -> list[str]:
            overrides = [f"train.steps={steps}", f"train.seed={self.seed}", f"data.seed={self.seed}", *sets()]
            return _unclip("train", "--config", str(CONFIGS / config), "--run-dir", str(run_dir),
                           "--nproc", str(self.preset.nproc), *[a for o in overrides for a in ("--set", o)])

        done = lambda: self.weight(stage).exists() or _trained_to(run_dir, steps)  # noqa: E731
        return Stage(stage, done, argv, self.preset.expected_s[stage], run_dir / "metrics.jsonl", steps)

    def _export(self, stages: tuple[str, ...]) -> Stage:
        """One `unclip export` process for `stages` (their EMA weights into weights/)."""
        out = self.weight(stages[0]) if len(stages) == 1 else self.weights
        return Stage(f"export {' '.join(stages)}", lambda: all(self.weight(s).exists() for s in stages),
                     lambda: _unclip("export", *[str(self.runs / s) for s in stages], "--out", str(out)),
                     self.preset.expected_s["export"])

    def stages(self) -> list[Stage]:
        p = self.preset
        clip = lambda: f"clip.pretrained={self.weight('clip')}"  # noqa: E731
        shards = Stage("shards", lambda: (self.data / "sizes.json").exists(), lambda: _unclip(
            "shards", "--source", "shapes", "--out", str(self.data), "--count", str(p.samples),
            "--size", str(p.image_size), "--per-shard", str(max(64, p.samples // 8)), "--seed", "0"),
            p.expected_s["shards"])
        precompute = Stage("precompute", lambda: (self.embeddings / "_SUCCESS").exists(), lambda: _unclip(
            "precompute", "--config", str(CONFIGS / "precompute.yaml"), "--shards", _shard_pattern(self.data),
            "--out", str(self.embeddings), "--nproc", str(p.nproc), "--set", clip()), p.expected_s["precompute"])
        with_embeddings = lambda: [self._data(self.embeddings), clip()]  # noqa: E731
        return [
            shards,
            self._train("clip", "clip.yaml", lambda: [self._data()]),
            self._export(("clip",)),
            precompute,
            self._train("prior", "prior.yaml", with_embeddings),
            self._train("decoder", "decoder.yaml", with_embeddings),
            self._train("upsampler", "upsampler.yaml", lambda: [self._data()]),
            self._export(("prior", "decoder", "upsampler")),
        ]

    def claim_root(self, preset_name: str) -> Optional[str]:
        """Record this root's seed and preset; the problem, if it holds a run of others."""
        record = self.root / "demo.json"
        mine = {"seed": self.seed, "preset": preset_name}
        if record.exists():
            theirs = json.loads(record.read_text())
            if theirs != mine:
                return (f"{self.root} holds a demo run with seed {theirs.get('seed')} and preset "
                        f"{theirs.get('preset')!r}; use another --out for seed {self.seed}, preset {preset_name!r}")
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(mine) + "\n")
        return None

    def sample_command(self) -> str:
        """The command that samples more from this run's weights."""
        return shlex.join(["unclip", "sample", "--weights", str(self.weights), "--prompt",
                           "a red circle", "-n", "8", "--seed", "1", "--out", str(self.root / "more")])

    def run(self) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        stages = self.stages()
        start = time.monotonic()
        remaining = sum(s.expected_s for s in stages) + self.preset.expected_s["report"]
        for i, stage in enumerate(stages, 1):
            head = f"[{i}/{len(stages)}] {stage.name}"
            if stage.done():
                print(f"{head}: done already, skipped", flush=True)
                remaining -= stage.expected_s
                continue
            print(f"{head}: running (about {_fmt(remaining)} left in the demo)", flush=True)
            t0 = time.monotonic()
            rc = self._run_stage(stage, head)
            if rc != 0:
                log = self.logs / f"{_slug(stage.name)}.log"
                print(f"{head}: FAILED (exit {rc}); its log: {log}", file=sys.stderr)
                _tail(log)
                return EXIT_RUNTIME
            remaining -= stage.expected_s
            print(f"{head}: finished in {_fmt(time.monotonic() - t0)}", flush=True)
        from launch.demo.report import write_samples_and_report

        print(f"[{len(stages) + 1}/{len(stages) + 1}] sample and report: running (about {_fmt(remaining)} left "
              f"in the demo)", flush=True)
        samples, report = write_samples_and_report(self, self.preset)
        print(f"demo finished in {_fmt(time.monotonic() - start)}")
        print(f"samples: {samples}")
        print(f"report:  {report}")
        print(f"sample more from its weights:\n  {self.sample_command()}")
        return EXIT_OK

    def _run_stage(self, stage: Stage, head: str) -> int:
        log = self.logs / f"{_slug(stage.name)}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "w") as out:
            proc = subprocess.Popen(stage.argv(), stdout=out, stderr=subprocess.STDOUT, env=env)
            stop = threading.Event()
            watcher = threading.Thread(target=_watch_progress, args=(stage, head, stop, time.monotonic()), daemon=True)
            watcher.start()
            try:
                return proc.wait()
            except KeyboardInterrupt:
                proc.terminate()  # training stages checkpoint on SIGTERM: re-running resumes
                proc.wait()
                raise
            finally:
                stop.set()
                watcher.join()


def _watch_progress(stage: Stage, head: str, stop: threading.Event, t0: float) -> None:
    """Print `step/steps` of a training stage every 15 s, with the stage's ETA."""
    if stage.progress_file is None:
        return
    while not stop.wait(15):
        step = _last_step(stage.progress_file)
        if step:
            elapsed = time.monotonic() - t0
            eta = elapsed / step * max(stage.total_steps - step, 0)
            print(f"{head}: step {step}/{stage.total_steps} ({100 * step // stage.total_steps}%), "
                  f"ETA {_fmt(eta)}", flush=True)


def _trained_to(run_dir: Path, steps: int) -> bool:
    """Whether `run_dir` holds a complete checkpoint at step `steps` or later."""
    from models.weights import find_latest, read_meta

    latest = find_latest(run_dir / "checkpoints")
    return latest is not None and read_meta(latest)["step"] >= steps


def _last_step(path: Path) -> int:
    try:
        lines = path.read_text().strip().splitlines()
        return int(json.loads(lines[-1]).get("step", 0)) if lines else 0
    except (OSError, ValueError):
        return 0


def _tail(path: Path, lines: int = 20) -> None:
    try:
        text = path.read_text().splitlines()[-lines:]
    except OSError:
        return
    for line in text:
        print(f"    {line}", file=sys.stderr)


def _slug(name: str) -> str:
    return name.replace(" ", "_")


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def main(args: argparse.Namespace) -> int:
    name = "quick" if args.quick else "full"
    demo = Demo(Path(args.out).resolve(), PRESETS[name], seed=args.seed)
    problem = demo.claim_root(name)
    if problem:
        print(f"unclip demo: {problem}", file=sys.stderr)
        return EXIT_USAGE
    return demo.run()
