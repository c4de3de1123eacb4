"""The training loop every stage shares, run once per rank.

    set up:  join the process group -> build the stage's model -> DeepSpeed engine -> EMA
             -> data loader -> resume from the latest complete checkpoint (if any) -> held-out set
    step:    LR -> grad_accum x (next batch, loss, backward) -> optimizer step (DeepSpeed
             skips it if a gradient is not finite) -> EMA -> agree across ranks on loss,
             skips, stop requests and checkpoint clocks -> validation every N steps -> log
             -> checkpoint every N steps and/or M minutes
    stop:    at the last step, on SIGTERM/SIGINT (checkpoint, exit 0), or after too many
             non-finite steps in a row (checkpoint of the last good state, exit 1)
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from models import stages
from models.config import ConfigError, config_to_dict
from models.stages import StageContext, StageSpec
from models.weights import read_meta
from trainer import distributed as dist
from trainer import rng
from trainer.checkpoint import CheckpointError, Checkpoints, resume_problem, torch_version_info
from trainer.config import TrainJob
from trainer.ema import ShardedEMA
from trainer.engine import StageModule, build_engine, count_parameters, resolve_precision, set_lr, skipped_steps
from trainer.masters import master_pieces
from trainer.faults import Faults
from trainer.flops import counted
from trainer.init_from import load_init_from
from trainer.lr import lr_at
from trainer.metrics import Metrics
from trainer.samples import grid_path, keep_for_sampling, share, write_grid
from trainer.synthetic import SyntheticLoader
from trainer.validation import Validator


def deterministic(job: TrainJob, device: str) -> bool:
    """`train.deterministic`, where unset: on for CPU jobs (bit-identical resume), off on GPUs."""
    if job.train.deterministic is not None:
        return job.train.deterministic
    return not device.startswith("cuda")


class TrainingAborted(RuntimeError):
    """The run cannot go on (e.g. only non-finite steps); a checkpoint was written first."""


class StopRequest:
    """Set by SIGTERM/SIGINT; the loop checks it between steps (all ranks agree on it)."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum


class Batches:
    """Endless batches from a resumable loader (passes over the data follow one another);
    `state_dict()` is the loader's position after the last batch handed out."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._it: Optional[Any] = None

    def __next__(self) -> dict[str, Any]:
        for _ in range(2):  # a fresh pass that is empty at once means no data at all
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise RuntimeError("the data loader yields no batches (check data.sources)")

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._it = None

    def layout_matches(self, state: dict[str, Any]) -> bool:
        return getattr(self.loader, "layout_matches", lambda s: True)(state)

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        self.loader.load_state_dicts(states)
        self._it = None

    @property
    def skipped(self) -> dict[str, int]:
        return dict(getattr(self.loader, "skipped", {}) or {})


def batch_to(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def open_loader(
    job: TrainJob, spec: StageSpec, rank: int, world_size: int, *, want: Optional[frozenset[str]] = None,
    one_pass: bool = False,
) -> Any:
    """The job's data loader for this rank (synthetic data when the job has no `data:`):
    `Batches` with the loss's fields, or with `one_pass` an iterator that ends with one pass
    over the data in a fixed order (a preparation's; `want`: its fields)."""
    wants = spec.fields(job) if want is None else want
    if job.data is None:
        shapes = {k: v for k, v in spec.field_shapes(job).items() if k in wants}
        loader = SyntheticLoader(shapes, batch_size=job.train.micro_batch_size, rank=rank, seed=job.train.seed)
        return iter(loader) if one_pass else Batches(loader)
    from data_pipeline.stream import build_loader

    tokenizer = spec.tokenizer(job) if "tokens" in wants else None
    loader = build_loader(
        job.data.single_pass() if one_pass else job.data, batch_size=job.train.micro_batch_size, rank=rank,
        world_size=world_size, want=set(wants), tokenizer=tokenizer,
        drop_last=not one_pass,  # every rank steps with full micro-batches
    )
    return iter(loader) if one_pass else Batches(loader)


class Trainer:
    def __init__(self, job: TrainJob, run_dir: Path, info: dist.WorldInfo, device: str) -> None:
        self.job, self.run_dir, self.info, self.device = job, Path(run_dir), info, device
        self.rank, self.world_size = info.rank, info.world_size
        self.spec = stages.get(job.stage)
        self.faults = Faults()
        self.stop = StopRequest()
        self.ckpt = Checkpoints(self.run_dir / "checkpoints", self.rank, self.world_size, job.checkpoint.keep_last)
        self.step = 0
        self.samples_seen = 0
        self.nonfinite_total = 0
        self.consecutive_nonfinite = 0
        self.window = {"steps": 0, "step_time_s": 0.0, "data_wait_s": 0.0}  # since the last logging step
        self.sample_every = job.train.sample_every if self.spec.sample_grid is not None else 0
        self.sample_batch: Optional[dict[str, Any]] = None  # this rank's conditions of every grid
        self.flops_per_sample: Optional[float] = None
        self.last_save = time.monotonic()  # checkpoint.every_minutes counts from here
        self.validator: Optional[Validator] = None

    # ------------------------------------------------------------------ set-up
    def setup(self, resume: bool) -> None:
        job = self.job
        self._check_compile()
        if deterministic(job, self.device) and self.device.startswith("cuda"):
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic mode
        torch.use_deterministic_algorithms(deterministic(job, self.device), warn_only=True)
        resume_dir = self._find_resume() if resume else None
        meta = read_meta(resume_dir) if resume_dir is not None else None
        # DeepSpeed loads its sharded states only into the same layout; for another world size or
        # ZeRO stage the checkpoint goes through its universal (layout-free) form.
        universal = meta is not None and (meta["world_size"], meta["zero_stage"]) != (
            self.world_size, job.deepspeed.zero_stage
        )
        if meta is not None:
            problem = resume_problem(meta, config_to_dict(job), resume_dir)
            if problem:
                raise CheckpointError(problem)
            if universal:
                self._say(
                    f"world size {meta['world_size']} -> {self.world_size}, ZeRO {meta['zero_stage']} -> "
                    f"{job.deepspeed.zero_stage}: converting {resume_dir.name} to a universal checkpoint"
                )
                self.ckpt.ensure_universal(resume_dir)

        rng.seed_everything(job.train.seed)  # identical initial weights on every rank
        model = self.spec.build(job, activation_checkpointing=job.deepspeed.activation_checkpointing)
        if meta is None and job.init_from is not None:  # every rank loads, before ZeRO partitions
            self._say(load_init_from(job, model))
        elif job.init_from is not None:
            self._say(f"init_from {job.init_from} ignored: resuming from the run's own checkpoint {resume_dir}")
        if job.train.compile:
            model.compile(backend=job.train.compile)  # in place: same module, same state dict
        self.module = StageModule(self.spec, model, StageContext(self.rank, self.world_size), device=self.device)
        self.loader = open_loader(job, self.spec, self.rank, self.world_size)
        if meta is None and job.init_from is None:  # initial weights bring their prepared buffers
            self._prepare(model)
        self.engine, self.ds_config = build_engine(
            self.module, job, self.world_size, self.device, load_universal=universal, run_dir=self.run_dir
        )
        self.optimizer_guard = self.engine.client_optimizer if hasattr(self.engine, "client_optimizer") else None
        self._register_direct_parameters(model)
        self.ema = ShardedEMA(
            self.engine.module, job.train.ema_decay, self.rank, self.world_size,
            pieces=master_pieces(self.engine, self.rank, self.world_size), all_reduce=dist.all_reduce_tensor,
        )
        self.n_params = count_parameters(self.engine.module.parameters())
        rng.seed_everything(job.train.seed * 1000 + self.rank, self.module.generator)
        if meta is not None:
            self._restore(resume_dir, meta, universal)
            self.ema.bind(master_pieces(self.engine, self.rank, self.world_size))  # DeepSpeed's loaded buffers
        if job.validation.every_steps:
            self.validator = Validator(job, self.spec, self.rank, self.world_size, self.device)
        self.metrics = Metrics(
            job.name, job.stage, self.rank, self.world_size, self.run_dir, job.metrics, self.info.local_rank,
            monitor=getattr(self.engine, "monitor", None),
        )
        self.metrics.start()
        self.stop.install()

    def _check_compile(self) -> None:
        if self.job.train.compile and self.job.deepspeed.zero_stage == 3:
            raise ConfigError(
                "train.compile: not with deepspeed.zero_stage 3 (its parameter hooks need DeepSpeed's own compiler); "
                "use ZeRO 0-2 or leave train.compile unset"
            )

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(f"[unclip train] {message}", flush=True)

    def _find_resume(self) -> Optional[Path]:
        found = self.ckpt.find_latest() if self.rank == 0 else None
        found = dist.broadcast_object(str(found) if found is not None else None)
        return Path(found) if found is not None else None

    def _prepare(self, model: torch.nn.Module) -> None:
        """The stage's preparation (e.g. the autoregressive prior's PCA fit), run by rank 0 on
        a stream of its own (the training data order is untouched); its result, the model's
        persistent buffers, is broadcast to every rank."""
        prepare = self.spec.preparation(self.job)
        if prepare is None:
            return
        if self.rank == 0:
            fields = self.spec.preparation_fields(self.job) if self.spec.preparation_fields else None
            prepare(model, open_loader(self.job, self.spec, 0, 1, want=fields, one_pass=True))
        buffers = {k: v.cpu() for k, v in model.named_buffers() if _persistent(model, k)}
        buffers = dist.broadcast_object(buffers)
        if self.rank != 0:
            model.load_state_dict(buffers, strict=False)

    def _register_direct_parameters(self, model: torch.nn.Module) -> None:
        # ZeRO-3 gathers a module's parameters when that module's forward runs; a stage's loss
        # may use the model's own (not a submodule's) parameters outside its forward.
        if self.job.deepspeed.zero_stage == 3:
            import deepspeed

            for p in model.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(self.engine.module, p)

    def _restore(self, step_dir: Path, meta: dict[str, Any], universal: bool) -> None:
        self.ckpt.load_engine(self.engine, step_dir, universal=universal)
        old_world = meta["world_size"]
        plain, tensors = self.ckpt.rank_state(step_dir, min(self.rank, old_world - 1))
        if universal:
            shards = [tensors if r == self.rank else self.ckpt.rank_state(step_dir, r)[1] for r in range(old_world)]
            self.ema.load_shards([_ema_part(s) for s in shards])
        else:
            self.ema.load_own(_ema_part(tensors))
        self.step, self.samples_seen = meta["step"], meta["samples_seen"]
        self.nonfinite_total = meta.get("nonfinite_steps", 0)
        self.flops_per_sample = meta.get("flops_per_sample")
        if not universal:  # same ranks, same streams: continue every random stream exactly
            rng.restore(plain["rng"], tensors, self.module.generator)
        else:  # re-seed so the new ranks do not replay the old draws
            rng.seed_everything(self.job.train.seed * 1000 + self.rank + 7919 * self.step, self.module.generator)
        self._restore_data_position(step_dir, plain["loader"], old_world)
        self._say(f"resumed from {step_dir} (step {self.step}, {self.samples_seen} samples, world size {old_world})")

    def _restore_data_position(self, step_dir: Path, own: dict[str, Any], old_world: int) -> None:
        """Same layout: this rank's own position. Another world size or worker count: every
        old rank's, so the pass they were in goes on, each sample once (data_pipeline.reshard)."""
        if self.loader.layout_matches(own):
            self.loader.load_state_dict(own)
            return
        self.loader.load_state_dicts([self.ckpt.rank_plain(step_dir, r)["loader"] for r in range(old_world)])
        self._say(f"data position of {own['world_size']} rank(s) x {own['workers']} worker(s) carried over: "
                  "the pass goes on where it was")

    # ------------------------------------------------------------------ steps
    def run(self) -> int:
        job = self.job
        self._say(
            f"stage {job.stage}: {self.n_params:,} parameters, world size {self.world_size}, ZeRO {job.deepspeed.zero_stage}, "
            f"{resolve_precision(job.deepspeed.precision, self.device)}, steps {self.step} -> {job.train.steps}"
        )
        resumed_at = self.step
        self.last_save = time.monotonic()
        while self.step < job.train.steps:
            loss, flags = self._train_step()
            self.step += 1
            self.faults.after_step(self.rank, self.step)
            if self._after_step(loss, flags):
                return 0
        if self.step != resumed_at or resumed_at == 0:  # never rewrite the checkpoint we resumed from
            self.save()
        return 0

    def _train_step(self) -> tuple[float, dict[str, float]]:
        job = self.job
        lr = lr_at(self.step, job.optim, job.train.steps)
        set_lr(self.engine, lr)
        started = time.perf_counter()
        data_wait, losses = 0.0, []
        skipped_before = skipped_steps(self.engine, self.optimizer_guard)
        for _ in range(job.train.grad_accum):
            waited = time.perf_counter()
            batch = next(self.loader)
            data_wait += time.perf_counter() - waited
            if self.sample_every and self.sample_batch is None:
                self.sample_batch = keep_for_sampling(batch, share(self.rank, self.world_size, job.train.micro_batch_size))
            loss = self._forward_backward(batch_to(batch, self.device))
            self.engine.step()
            losses.append(float(loss.detach()))
        skipped = skipped_steps(self.engine, self.optimizer_guard) > skipped_before
        finite = [x for x in losses if math.isfinite(x)]
        every = job.checkpoint.every_minutes
        save_due = every is not None and time.monotonic() - self.last_save >= 60 * every
        # one collective per step: loss sum and count, ranks with a non-finite loss, stop requests,
        # ranks whose checkpoint clock is due
        total, count, bad, stop, due = dist.all_reduce_sum(
            [sum(finite), len(finite), float(len(finite) < len(losses) or skipped), float(self.stop.signal is not None),
             float(save_due)]
        )
        flags = {
            "lr": lr, "skipped": bad > 0, "stop": stop > 0, "save_due": due > 0, "data_wait_s": data_wait,
            "step_time_s": time.perf_counter() - started,
        }
        return (total / count if count else float("nan")), flags

    def _forward_backward(self, batch: dict[str, Any]) -> torch.Tensor:
        def run() -> torch.Tensor:
            loss = self.engine(batch)
            if self.faults.nan_loss(self.step):
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.faults.after_backward(self.rank, self.step + 1)
            return loss

        if self.flops_per_sample is not None or self.step > 0:
            return run()
        # Count the run's very first micro-batch (model FLOPs, for MFU). Counting can pick other
        # kernels (e.g. attention), so only step 0 is counted and resumed runs take the count
        # from the checkpoint: a resumed run stays bit-identical to one that never stopped.
        loss, flops = counted(run)
        self.flops_per_sample = flops / self.job.train.micro_batch_size
        return loss

    def _after_step(self, loss: float, flags: dict[str, Any]) -> bool:
        """Bookkeeping after optimizer step `self.step`; True when the run should stop now."""
        job = self.job
        self.samples_seen += job.train.micro_batch_size * job.train.grad_accum * self.world_size
        if flags["skipped"]:
            self._on_nonfinite()
        else:
            self.consecutive_nonfinite = 0
            self.ema.update(self.step)
        self._log(loss, flags, self._validate())
        if self.sample_every and self.step % self.sample_every == 0:
            self._sample()
        if flags["stop"]:
            self._say(f"stop requested (signal): saving a checkpoint at step {self.step}")
            self.save()
            return True
        every_steps = job.checkpoint.every_steps
        if (flags["save_due"] or every_steps and self.step % every_steps == 0) and self.step < job.train.steps:
            self.save()
        return False

    def _log(self, loss: float, flags: dict[str, Any], validation: Optional[dict[str, float]] = None) -> None:
        w = self.window
        w["steps"] += 1
        w["step_time_s"] += flags["step_time_s"]
        w["data_wait_s"] += flags["data_wait_s"]
        self.metrics.observe_step(flags["step_time_s"])
        # a validation step is a logging step: its values go out with the step they belong to
        if self.step % self.job.train.log_every and self.step != self.job.train.steps and not validation:
            return
        grad_norm = None if flags["skipped"] else self.engine.get_global_grad_norm()
        skipped_samples = getattr(self.loader, "skipped", None)
        if skipped_samples:
            self.metrics.set_skipped_samples(dict(skipped_samples))
        # Logging may draw random numbers (the first one measures peak FLOP/s): keep them out of
        # the training streams, so a resumed run stays bit-identical.
        with torch.random.fork_rng(devices=[]):
            self.metrics.log_step(  # a collective: every rank logs at the same steps
                self.step,
                loss=loss,
                samples_total=self.samples_seen // self.world_size,
                lr=flags["lr"],
                grad_norm=None if grad_norm is None else float(grad_norm),
                step_time_s=w["step_time_s"] / w["steps"],
                data_wait_s=w["data_wait_s"] / w["steps"],
                flops_per_sample=self.flops_per_sample,
                validation=validation or {},
            )
        self.window = {"steps": 0, "step_time_s": 0.0, "data_wait_s": 0.0}

    # ------------------------------------------------------------------ validation
    def _validate(self) -> Optional[dict[str, float]]:
        """The held-out metrics at this step when due (a collective: every rank), else None.
        Eval mode, own generators, the training streams forked off: training after a
        validation is bit-identical to training without one."""
        if self.validator is None or not self.validator.due(self.step):
            return None
        started = time.perf_counter()
        self.engine.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                values = self.validator.run(self.engine)
        finally:
            self.engine.train()
        values["seconds"] = time.perf_counter() - started
        return values

    def _on_nonfinite(self) -> None:
        self.nonfinite_total += 1
        self.consecutive_nonfinite += 1
        self.metrics.count_skipped_step("nonfinite")
        self._say(f"step {self.step}: non-finite loss or gradient; step skipped ({self.consecutive_nonfinite} in a row)")
        limit = self.job.train.max_consecutive_nonfinite
        if self.consecutive_nonfinite >= limit:
            # skipped steps change no weights: the current state is the last good one
            path = self.save()
            raise TrainingAborted(
                f"{limit} consecutive steps had a non-finite loss or gradient (last at step {self.step}); "
                f"stopping. The last good state is saved in {path}. Lower optim.lr, raise optim.warmup_steps "
                "or check the data."
            )

    def _sample(self) -> None:
        started = time.perf_counter()
        # building the sampling model draws init weights: keep that out of the training streams
        devices = [torch.device(self.device).index or 0] if self.device.startswith("cuda") else []
        with torch.random.fork_rng(devices=devices):
            out = self._write_grid()
        if out is not None:
            self._say(f"samples {out} ({time.perf_counter() - started:.1f}s)")

    def _write_grid(self) -> Optional[Path]:
        return write_grid(
            spec=self.spec, job=self.job, ema=self.ema, buffers=self._buffers(), batch=self.sample_batch,
            seed=self.job.train.seed, out=grid_path(self.run_dir, self.step), rank=self.rank, device=self.device,
            precision=resolve_precision(self.job.deepspeed.precision, self.device),
        )

    def _export_shapes(self) -> dict[str, list[int]]:
        """Full shapes of the trained parameters as the model declares them."""
        return {k: list(self.module.original_shapes.get(k, v)) for k, v in self.ema.shapes.items()}

    def _buffers(self) -> dict[str, torch.Tensor]:
        module = self.engine.module
        return {k.removeprefix("model."): v.cpu() for k, v in module.named_buffers() if _persistent(module, k)}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        started = time.perf_counter()
        plain_rng, rng_tensors = rng.capture(self.module.generator)
        tensors = {**rng_tensors, **{f"ema/{k}": v for k, v in self.ema.state_dict().items()}}
        rank_state = {"rng": plain_rng, "loader": self.loader.state_dict(), "rank": self.rank}
        meta = {
            "stage": self.job.stage,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "world_size": self.world_size,
            "zero_stage": self.job.deepspeed.zero_stage,
            "precision": resolve_precision(self.job.deepspeed.precision, self.device),
            "nonfinite_steps": self.nonfinite_total,
            "flops_per_sample": self.flops_per_sample,
            "param_shapes": {k.removeprefix("model."): v for k, v in self._export_shapes().items()},
            "config": config_to_dict(self.job),
            "versions": torch_version_info(),
        }
        path = self.ckpt.save(
            self.engine, self.step, rank_tensors=tensors, rank_state=rank_state, buffers=self._buffers(), meta=meta,
            on_written=lambda: self.faults.during_save(self.step),
        )
        seconds = time.perf_counter() - started
        self.last_save = time.monotonic()
        self.metrics.checkpoint_saved(self.step, seconds)
        self._say(f"checkpoint {path} ({seconds:.1f}s)")
        return path

    def close(self) -> None:
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()


def _ema_part(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("ema/"): v for k, v in tensors.items() if k.startswith("ema/")}


def _persistent(module: torch.nn.Module, name: str) -> bool:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    return leaf not in owner._non_persistent_buffers_set


def train(job: TrainJob, run_dir: Path, *, resume: bool = True) -> int:
    """Train `job` as this process's rank (rank discovery from the environment). Exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    info = dist.world_info_from_env()
    device = dist.init_process_group(info, job.deepspeed.timeout_s)
    trainer = Trainer(job, run_dir, info, device)
    try:
        trainer.setup(resume)
        code = trainer.run()
        dist.barrier()
        dist.destroy()  # only after success: with a peer gone, tearing down could block
        return code
    except (TrainingAborted, CheckpointError) as err:
        print(f"[unclip train] rank {info.rank}: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        trainer.close()
