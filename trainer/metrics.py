"""Metrics of every job: a Prometheus exporter, `RUN_DIR/metrics.jsonl` and a console line.

Every rank computes its own values; at a logging step ONE small all-reduce (a float64 vector
of ~30 numbers) tells global rank 0 the job's values, exported as `rank="all"` beside its own
`rank="0"`: extensive quantities summed (samples, samples/s, FLOP/s, memory, skipped
samples), intensive ones averaged (loss, step time, data wait), job-wide decisions as rank 0
sees them (step, lr, grad norm, skipped steps, checkpoints). Rank 0 serves on `cfg.port`;
per-rank exporters serve on port + local rank; `cfg.pushgateway` pushes instead, off the step
path. Counters carry the run's absolute totals (as in metrics.jsonl and checkpoints), so a
resume looks like a counter reset: dashboards read the samples/s gauge, not rate().
Validation values (trainer/validation.py) arrive already job-wide and are exported like the
learning rate. The step-time histogram observes every step's own time (`observe_step`); the
gauges and metrics.jsonl carry window means. With DeepSpeed's monitors enabled (`deepspeed.extra`:
tensorboard, csv_monitor, wandb) every logged value also goes to them as `unclip/<name>`.
Serving, labels and the metric table: configs/monitoring/README.md.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Mapping, Optional

import torch
from prometheus_client import CollectorRegistry, push_to_gateway, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from data_pipeline.stats import REASONS as DATA_SKIP_REASONS
from trainer.flops import measure_peak_flops
from trainer.monitors import monitor_events
from trainer.report import VALIDATION_PREFIX, console_line, plot_run

log = logging.getLogger("unclip.metrics")

LABELS = ("job", "stage", "rank")
AGGREGATE_RANK = "all"
STEP_TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Sample skip reasons are a fixed vocabulary (so every rank's all-reduce vector has the same
# layout); anything else is counted as "other". Step skip reasons come from the trainer and
# are bounded by count instead.
SAMPLE_SKIP_REASONS = tuple(DATA_SKIP_REASONS) + ("other",)
MAX_STEP_SKIP_REASONS = 16
COMPONENT_PREFIX = "unclip_loss_"  # loss components: unclip_loss_<name>, one gauge each
MAX_COMPONENTS = 16
PER_RANK_ENV = "UNCLIP_METRICS_PER_RANK"


@dataclass(frozen=True)
class MetricSpec:
    kind: str  # "gauge" | "counter" | "histogram"
    help: str
    by_reason: bool = False


def _g(help: str) -> MetricSpec:
    return MetricSpec("gauge", help)


SPECS: dict[str, MetricSpec] = {
    "unclip_loss": _g("Training loss at the logging step (rank all: mean over ranks)."),
    "unclip_learning_rate": _g("Learning rate at the logging step."),
    "unclip_grad_norm": _g("Global gradient norm before clipping at the logging step."),
    "unclip_steps_total": MetricSpec("counter", "Optimizer steps done by the run."),
    "unclip_samples_total": MetricSpec("counter", "Training samples consumed by the run (rank all: sum)."),
    "unclip_step_time_seconds": MetricSpec("histogram", "Wall seconds per optimizer step, data wait included (each step observed; rank all: rank 0's)."),
    "unclip_data_wait_seconds": _g("Seconds per step spent waiting for the data loader (window mean)."),
    "unclip_data_wait_ratio": _g("Share of the step time spent waiting for data, 0-1."),
    "unclip_samples_per_second": _g("Training samples per second while stepping (rank all: sum)."),
    "unclip_flops_per_sample": _g("Model FLOPs of one sample's forward+backward, counted with FlopCounterMode."),
    "unclip_model_flops_per_second": _g("Estimated model FLOP/s: flops per sample x samples/s (rank all: sum)."),
    "unclip_peak_flops_per_second": _g("Peak FLOP/s per device used for MFU: config value or measured matmul rate."),
    "unclip_mfu_ratio": _g("Model FLOPs utilisation, 0-1: model FLOP/s over peak FLOP/s."),
    "unclip_memory_used_bytes": _g("Memory in use: CUDA allocated bytes with a GPU, else process RSS (rank all: sum)."),
    "unclip_memory_peak_bytes": _g("Peak memory: CUDA max allocated bytes with a GPU, else peak RSS (rank all: sum)."),
    "unclip_skipped_samples_total": MetricSpec("counter", "Samples skipped by the data pipeline, by reason.", True),
    "unclip_skipped_steps_total": MetricSpec("counter", "Optimizer steps skipped (non-finite loss/grads), by reason.", True),
    "unclip_checkpoint_save_seconds": _g("Wall seconds of the last checkpoint save."),
    "unclip_checkpoints_saved_total": MetricSpec("counter", "Checkpoints saved by this process."),
    "unclip_last_checkpoint_step": _g("Step of the last checkpoint saved."),
    "unclip_last_checkpoint_timestamp_seconds": _g("Unix time of the last checkpoint saved."),
    "unclip_last_log_timestamp_seconds": _g("Unix time of the last logging step."),
    "unclip_start_timestamp_seconds": _g("Unix time the process started its metrics."),
    "unclip_world_size": _g("Number of ranks in the job."),
    "unclip_precompute_samples_total": MetricSpec("counter", "Samples embedded by the CLIP precompute job."),
    "unclip_precompute_shards_total": MetricSpec("counter", "Shards finished by the CLIP precompute job."),
    "unclip_precompute_samples_per_second": _g("CLIP precompute samples per second since start."),
    "unclip_validation_loss": _g("The stage's loss on the fixed held-out batches (eval mode, fixed timesteps and noise), job mean."),
    "unclip_validation_seconds": _g("Wall seconds of the last validation."),
}

_MEAN_KEYS = ("unclip_loss", "unclip_step_time_seconds", "unclip_data_wait_seconds")
_FLOPS_KEYS = ("unclip_model_flops_per_second", "unclip_peak_flops_per_second")
_SUM_KEYS = ("unclip_samples_total", "unclip_samples_per_second", *_FLOPS_KEYS, "unclip_memory_used_bytes", "unclip_memory_peak_bytes")

_GAUGE = MetricSpec("gauge", "Loss component reported by the training stage.")
_CHECKPOINT_KEYS = ("unclip_checkpoints_saved_total", "unclip_checkpoint_save_seconds", "unclip_last_checkpoint_step", "unclip_last_checkpoint_timestamp_seconds")


@functools.cache
def metric_specs() -> dict[str, MetricSpec]:
    """SPECS and every stage's sampled validation metrics (`StageSpec.validation`)."""
    from models import stages

    out = dict(SPECS)
    for stage in stages.names():
        validation = stages.get(stage).validation
        for name, help in validation.metrics if validation is not None else ():
            out[VALIDATION_PREFIX + name] = _g(help)
    return out


def exported_names() -> set[str]:
    """Every sample name the exporter can emit (histograms as _bucket/_sum/_count)."""
    names = set()
    for name, spec in metric_specs().items():
        if spec.kind == "histogram":
            names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return names


def component_name(key: str) -> str:
    """Prometheus name of a loss component: `unclip_loss_<key>`, key lower-cased to [a-z0-9_]."""
    clean = re.sub(r"[^a-z0-9_]+", "_", key.lower()).strip("_")
    if not clean:
        raise ValueError(f"loss component {key!r} has no usable characters for a metric name")
    return COMPONENT_PREFIX + clean


def memory_bytes() -> tuple[float, float]:
    """(in use, peak) bytes: CUDA allocator when CUDA is in use, else this process's RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return float(torch.cuda.memory_allocated()), float(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        rss = peak  # no procfs (macOS): the peak is the best we have
    return float(rss), float(max(rss, peak))  # ru_maxrss lags statm by a page or two


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(STEP_TIME_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        index = next((i for i, le in enumerate(STEP_TIME_BUCKETS) if value <= le), len(STEP_TIME_BUCKETS))
        self.counts[index] += 1
        self.sum += value

    def family_buckets(self) -> list[tuple[str, float]]:
        cumulative, out = 0, []
        for le, count in zip(STEP_TIME_BUCKETS + (math.inf,), self.counts):
            cumulative += count
            out.append(("+Inf" if le == math.inf else repr(le), float(cumulative)))
        return out


class _Collector:
    """Turns the current values into Prometheus families at each scrape/push."""

    def __init__(self, owner: "Metrics") -> None:
        self.owner = owner

    def collect(self):
        owner = self.owner
        with owner._lock:
            series = dict(owner._series)
            hists = {rank: (h.family_buckets(), h.sum) for rank, h in owner._hists.items()}
        families: dict[str, Any] = {}
        specs = metric_specs()
        for (name, rank, reason), value in sorted(series.items()):
            spec = specs.get(name, _GAUGE)
            labels = list(LABELS) + (["reason"] if spec.by_reason else [])
            family = families.get(name)
            if family is None:
                cls = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
                family = families[name] = cls(name, spec.help, labels=labels)
            family.add_metric([owner.job, owner.stage, rank] + ([reason] if spec.by_reason else []), value)
        yield from families.values()
        if hists:
            name = "unclip_step_time_seconds"
            family = HistogramMetricFamily(name, SPECS[name].help, labels=list(LABELS))
            for rank, (buckets, total) in sorted(hists.items()):
                family.add_metric([owner.job, owner.stage, rank], buckets, sum_value=total)
            yield family


class _Pusher(threading.Thread):
    """Pushes the registry to a Pushgateway at most every `interval` seconds, off the step path."""

    def __init__(self, url: str, job: str, instance: str, registry: CollectorRegistry, interval: float) -> None:
        super().__init__(name="unclip-metrics-push", daemon=True)
        self.url, self.job, self.registry, self.interval = url, job, registry, interval
        # our series carry their own `job` label equal to the push job, so the gateway's
        # grouping key never contradicts them; `instance` keeps ranks in separate groups.
        self.grouping = {"instance": instance}
        self._wanted, self._closing = threading.Event(), threading.Event()
        self.failures = 0

    def request(self) -> None:
        self._wanted.set()

    def push(self) -> bool:
        try:
            push_to_gateway(self.url, job=self.job, registry=self.registry, grouping_key=self.grouping, timeout=5)
            return True
        except Exception as err:  # a monitoring outage must never stop training
            self.failures += 1
            if self.failures == 1 or self.failures % 100 == 0:
                log.warning("metrics: push to %s failed (%d so far): %s", self.url, self.failures, err)
            return False

    def run(self) -> None:
        while not self._closing.is_set():
            self._wanted.wait()
            if self._closing.is_set():
                break
            self._wanted.clear()
            self.push()
            self._closing.wait(self.interval)

    def stop(self) -> None:
        self._closing.set()
        self._wanted.set()
        self.join(timeout=10)
        self.push()  # the final values of a batch job


class Metrics:
    """The metrics of one process of a job (training stage or precompute).

    `job` is the job's name (config `name`), `stage` its stage (`prior`, `decoder`, ...,
    `precompute`). `run_dir` gets metrics.jsonl (rank 0 only); None writes no files.
    `per_rank` makes every rank export its own series, on `cfg.port + local_rank`; by
    default it is `cfg.per_rank` where the config has that key, else the environment
    variable UNCLIP_METRICS_PER_RANK=1 (set it for the launcher; it reaches every rank).
    """

    def __init__(
        self, job: str, stage: str, rank: int, world_size: int, run_dir: Optional[Path], cfg: Any, local_rank: int = 0,
        *, per_rank: Optional[bool] = None, console: bool = True, push_interval_s: float = 5.0, monitor: Any = None,
    ) -> None:  # fmt: skip
        if not 0 <= rank < world_size:
            raise ValueError(f"Metrics: rank {rank} is outside world_size {world_size}")
        self.job, self.stage, self.rank, self.world_size = job, stage, rank, world_size
        self.local_rank, self.cfg, self.console = local_rank, cfg, console
        self.monitor = monitor  # DeepSpeed's MonitorMaster (TensorBoard, CSV, W&B), or None
        self._monitor_failures = 0
        self._step_ranks = [str(rank)]  # whose step-time histograms a step goes to (see start())
        self.push_interval_s = push_interval_s
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if per_rank is None:
            per_rank = getattr(cfg, "per_rank", None)
        if per_rank is None:
            per_rank = os.environ.get(PER_RANK_ENV, "0").strip().lower() in ("1", "true", "yes")
        self.per_rank = bool(per_rank)
        self.exports = rank == 0 or self.per_rank  # settled in start(), once the process group exists
        self.port: Optional[int] = None  # the port actually served, once started
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str, str], float] = {}
        self._hists: dict[str, _Histogram] = {}
        self._server = self._pusher = None
        self._jsonl: Optional[IO[str]] = None
        self._prev: Optional[tuple[int, int]] = None  # (step, samples) at the previous logging step
        self._flops_per_sample: Optional[float] = None
        self._peak: Optional[float] = cfg.peak_flops
        self._skipped_samples: dict[str, int] = {}
        self._skipped_steps: dict[str, int] = {}
        self._started_at = time.time()
        self.last_record: Optional[dict[str, Any]] = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "Metrics":
        """Serve (or prepare pushing) and open metrics.jsonl; call once, before the loop."""
        self._started_at = time.time()
        with self._lock:
            self._series[("unclip_start_timestamp_seconds", str(self.rank), "")] = self._started_at
            self._series[("unclip_world_size", str(self.rank), "")] = float(self.world_size)
        # ranks that never meet in a process group (a precompute job array) cannot send their
        # values to rank 0, so each of them serves its own
        self.exports = self.exports or not self._joined()
        # steps are synchronous (every step ends in an all-reduce), so rank 0's step times are
        # the job's: its histogram stands for the job where it speaks for the job
        self._step_ranks = [str(self.rank)] + ([AGGREGATE_RANK] if self.rank == 0 and self._joined() else [])
        if self.exports and self.cfg.pushgateway:
            instance = f"{self.stage}-rank{self.rank}"
            self._pusher = _Pusher(self.cfg.pushgateway, self.job, instance, self.registry, self.push_interval_s)
            self._pusher.start()
        elif self.exports and self.cfg.port:
            port = self.cfg.port + self.local_rank
            try:
                self._server, _ = start_http_server(port, addr=self.cfg.host, registry=self.registry)
                self.port = port
            except OSError as err:  # a busy port must not kill a long job: say so loudly
                log.error("metrics: cannot serve on %s:%d (%s); continuing without an exporter", self.cfg.host, port, err)
        if self.rank == 0 and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        return self

    def close(self) -> None:
        """Final push, stop the server, close metrics.jsonl and draw RUN_DIR/report.png."""
        if self._pusher is not None:
            self._pusher.stop()
            self._pusher = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
            try:
                plot_run(self.run_dir)
            except (OSError, ValueError) as err:
                log.warning("metrics: could not draw %s/report.png: %s", self.run_dir, err)

    def __enter__(self) -> "Metrics":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- training
    def observe_step(self, seconds: float) -> None:
        """One optimizer step took `seconds` (wall, data wait included): the step-time histogram."""
        with self._lock:
            for rank in self._step_ranks:
                self._hists.setdefault(rank, _Histogram()).observe(seconds)

    def log_step(
        self, step: int, *, loss: float, samples_total: int, lr: float, grad_norm: Optional[float],
        step_time_s: float, data_wait_s: float, components: Mapping[str, float] = {}, flops_per_sample: Optional[float] = None,
        validation: Mapping[str, float] = {},
    ) -> Optional[dict[str, Any]]:  # fmt: skip
        """Record a logging step. A collective: call it on every rank at the same steps.

        Per-rank inputs: `samples_total` = samples this rank has consumed in the run,
        `step_time_s` / `data_wait_s` = mean wall seconds per step over the steps since the
        previous logging step (data wait is part of step time), `components` the loss terms
        (same keys on every rank). `flops_per_sample` once known (see trainer/flops.py) is
        kept for later steps. `validation`: job-wide values of a validation at this step
        (`loss`, `seconds`, the stage's metrics; trainer/validation.py), exported as
        `unclip_validation_<key>`. Returns the job record written to metrics.jsonl (rank 0).
        """
        if flops_per_sample is not None:
            self._flops_per_sample = float(flops_per_sample)
        if self._flops_per_sample is not None and self._peak is None:
            self._peak = measure_peak_flops()
        per_step = self._window(step, samples_total)
        rate = per_step / step_time_s if step_time_s > 0 else 0.0
        used, peak_mem = memory_bytes()
        flops = self._flops_per_sample * rate if self._flops_per_sample is not None else 0.0
        comps = {component_name(k): float(v) for k, v in sorted(components.items())[:MAX_COMPONENTS]}
        local = {
            "unclip_loss": float(loss),
            **comps,
            "unclip_step_time_seconds": float(step_time_s),
            "unclip_data_wait_seconds": float(data_wait_s),
            "unclip_samples_total": float(samples_total),
            "unclip_samples_per_second": rate,
            "unclip_model_flops_per_second": flops,
            "unclip_peak_flops_per_second": float(self._peak or 0.0),
            "unclip_memory_used_bytes": used,
            "unclip_memory_peak_bytes": peak_mem,
        }
        skips = [float(self._skipped_samples.get(r, 0)) for r in SAMPLE_SKIP_REASONS]
        job_values, job_skips = self._reduce(local, list(comps), skips)
        shared = {"unclip_steps_total": float(step), "unclip_learning_rate": float(lr), "unclip_last_log_timestamp_seconds": time.time()}
        if grad_norm is not None:
            shared["unclip_grad_norm"] = float(grad_norm)
        if self._flops_per_sample is not None:
            shared["unclip_flops_per_sample"] = self._flops_per_sample
        shared.update({VALIDATION_PREFIX + k: float(v) for k, v in validation.items()})
        mine = self._derive({**local, **shared})
        # only rank 0 speaks for the job: another rank's copy would be a duplicate series
        job = self._derive({**job_values, **shared}) if job_values is not None and self.rank == 0 else None
        with self._lock:
            self._publish(str(self.rank), mine, skips)
            if job is not None:
                self._publish(AGGREGATE_RANK, job, job_skips)
        self._request_push()
        if self.rank != 0:
            return None
        record = self._record(step, job or mine, job_skips if job is not None else skips)
        self.last_record = record
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
        if self.console:
            print(console_line(record), flush=True)
        self._write_monitors(record)
        return record

    def _write_monitors(self, record: dict[str, Any]) -> None:
        if self.monitor is None or not getattr(self.monitor, "enabled", False):
            return
        try:
            self.monitor.write_events(monitor_events(record))
        except Exception as err:  # a monitoring outage (W&B's network) must never stop training
            self._monitor_failures += 1
            if self._monitor_failures == 1 or self._monitor_failures % 100 == 0:
                log.warning("metrics: DeepSpeed monitor write failed (%d so far): %s", self._monitor_failures, err)

    def count_skipped_step(self, reason: str) -> None:
        """One optimizer step skipped (e.g. non-finite loss); the decision is job-wide."""
        if reason not in self._skipped_steps and len(self._skipped_steps) >= MAX_STEP_SKIP_REASONS:
            reason = "other"
        self._skipped_steps[reason] = self._skipped_steps.get(reason, 0) + 1
        with self._lock:
            for rank in self._ranks_owned():
                self._series[("unclip_skipped_steps_total", rank, reason)] = float(self._skipped_steps[reason])
        self._request_push()

    def set_skipped_samples(self, counts: Mapping[str, int]) -> None:
        """This rank's skipped samples so far, by reason (absolute counts, e.g. from the loader)."""
        bounded: dict[str, int] = {}
        for reason, n in counts.items():
            key = reason if reason in SAMPLE_SKIP_REASONS else "other"
            bounded[key] = bounded.get(key, 0) + int(n)
        self._skipped_samples = bounded
        with self._lock:
            for reason, n in bounded.items():
                self._series[("unclip_skipped_samples_total", str(self.rank), reason)] = float(n)

    def checkpoint_saved(self, step: int, seconds: float) -> None:
        """A checkpoint of `step` was saved in `seconds` (call on the ranks that saved)."""
        now = time.time()
        with self._lock:
            for rank in self._ranks_owned():
                saved = self._series.get(("unclip_checkpoints_saved_total", rank, ""), 0.0) + 1
                self._series[("unclip_checkpoints_saved_total", rank, "")] = saved
                self._series[("unclip_checkpoint_save_seconds", rank, "")] = float(seconds)
                self._series[("unclip_last_checkpoint_step", rank, "")] = float(step)
                self._series[("unclip_last_checkpoint_timestamp_seconds", rank, "")] = now
        self._request_push()

    # ----------------------------------------------------------------- precompute
    def precompute_progress(self, samples: int, shards: int) -> None:
        """This rank's precompute totals so far: samples embedded and shards finished."""
        elapsed = max(time.time() - self._started_at, 1e-9)
        with self._lock:
            rank = str(self.rank)
            self._series[("unclip_precompute_samples_total", rank, "")] = float(samples)
            self._series[("unclip_precompute_shards_total", rank, "")] = float(shards)
            self._series[("unclip_precompute_samples_per_second", rank, "")] = samples / elapsed
        self._request_push()

    # ----------------------------------------------------------------- internals
    def _ranks_owned(self) -> list[str]:
        # job-wide events (skipped steps, checkpoints) stand for the job on rank 0
        return [str(self.rank), AGGREGATE_RANK] if self.rank == 0 else [str(self.rank)]

    def _joined(self) -> bool:
        """Whether rank 0 can learn the job's values (one rank, or a process group)."""
        return self.world_size == 1 or (torch.distributed.is_available() and torch.distributed.is_initialized())

    def _reduce(self, local: dict[str, float], comps: list[str], skips: list[float]):
        """Job values from one all-reduce; (None, None) where no process group joins the ranks."""
        if self.world_size == 1:
            return dict(local), list(skips)
        if not self._joined():
            return None, None  # no collectives: per-rank series only
        mean_keys = list(_MEAN_KEYS) + comps
        keys = mean_keys + list(_SUM_KEYS)
        device = torch.device("cpu")
        if torch.distributed.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        vector = torch.tensor([local[k] for k in keys] + skips, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(vector)
        values = vector.tolist()
        job = {k: v / self.world_size if k in mean_keys else v for k, v in zip(keys, values)}
        return job, values[len(keys) :]

    def _window(self, step: int, samples_total: int) -> float:
        """Samples per step since the last logging step (at the first: over the whole run)."""
        previous, self._prev = self._prev, (step, samples_total)
        if previous is not None:
            return (samples_total - previous[1]) / max(1, step - previous[0])
        return samples_total / max(1, step)

    def _derive(self, values: dict[str, float]) -> dict[str, float]:
        """Add the ratios; drop FLOP figures until FLOPs per sample are known."""
        out = dict(values)
        step_time = out["unclip_step_time_seconds"]
        out["unclip_data_wait_ratio"] = min(1.0, out["unclip_data_wait_seconds"] / step_time) if step_time > 0 else 0.0
        if self._flops_per_sample is None:
            for name in _FLOPS_KEYS:
                out.pop(name)
        elif out["unclip_peak_flops_per_second"] > 0:
            out["unclip_mfu_ratio"] = out["unclip_model_flops_per_second"] / out["unclip_peak_flops_per_second"]
        return out

    def _publish(self, rank: str, values: dict[str, float], skips: list[float]) -> None:
        for name, value in values.items():
            if name != "unclip_step_time_seconds":  # a histogram, observed at every step
                self._series[(name, rank, "")] = value
        for reason, n in zip(SAMPLE_SKIP_REASONS, skips):
            if n or ("unclip_skipped_samples_total", rank, reason) in self._series:
                self._series[("unclip_skipped_samples_total", rank, reason)] = n

    def _record(self, step: int, values: dict[str, float], skips: list[float]) -> dict[str, Any]:
        """The metrics.jsonl line: the job's values under their Prometheus names."""
        record: dict[str, Any] = {"step": step, "time": round(time.time(), 3), "job": self.job, "stage": self.stage}
        record.update({k: _json_number(k, v) for k, v in values.items()})
        with self._lock:
            for name in _CHECKPOINT_KEYS:
                if (name, AGGREGATE_RANK, "") in self._series:
                    record[name] = self._series[(name, AGGREGATE_RANK, "")]
        record["unclip_world_size"] = self.world_size
        record["unclip_skipped_samples_total"] = {r: int(n) for r, n in zip(SAMPLE_SKIP_REASONS, skips) if n}
        record["unclip_skipped_steps_total"] = dict(self._skipped_steps)
        return record

    def _request_push(self) -> None:
        if self._pusher is not None:
            self._pusher.request()


def _json_number(name: str, value: float) -> Optional[float]:
    if not math.isfinite(value):
        return None  # strict JSON has no NaN: a non-finite loss is logged as null
    return int(value) if SPECS.get(name, _GAUGE).kind == "counter" else value


class NullMetrics:
    """Same interface as Metrics, does nothing: for tests, tools and helpers that log nowhere."""

    last_record = port = None

    def start(self) -> "NullMetrics":
        return self

    def __enter__(self) -> "NullMetrics":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _ignore(self, *args: Any, **kwargs: Any) -> None:
        pass

    log_step = observe_step = count_skipped_step = set_skipped_samples = checkpoint_saved = precompute_progress = close = _ignore
