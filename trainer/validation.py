"""Validation on fixed held-out batches, the same for every stage.

The held-out set is the first `validation.batches` batches of one pass over `data.validation`
in a fixed order (`DataConfig.single_pass`: epoch mode, the data's seed), or of a synthetic
stream that no training rank draws for a job without `data:`. Every rank reads the same
batches, in every run and after every resume, and keeps the ones it evaluates: rank r takes
batches r, r + W, ... Each batch's timesteps and noise come from a generator seeded by
(`validation.seed`, batch index), so successive values differ only by the weights, and the
job's figure does not depend on how many ranks share the work.

Every rank runs the same number of forwards (ZeRO-3 gathers weights with collectives inside
them): a rank past the end of the set repeats a batch and does not count it. The loss is the
stage's own, in eval mode (no dropout, no condition dropping); the stage's spec adds what it
measures by sampling (`StageSpec.validation`) on the first `validation.sample_batches`.
Values are means over batches (the loss) or items (sampled metrics), summed across ranks in
one all-reduce.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from models.config import ConfigError
from models.stages import Batch, Measure, StageSpec
from trainer import distributed as dist
from trainer.config import TrainJob
from trainer.synthetic import SyntheticLoader

LOSS = "loss"  # exported as unclip_validation_loss
HELD_OUT_RANK = -1  # the synthetic stream of a rank that never trains: same relation, other samples
_SAMPLING = 1  # second generator stream per batch: the samples' noise, apart from the loss's


def assignments(count: int, rank: int, world_size: int) -> list[tuple[int, bool]]:
    """(batch index, counted) for each forward rank `rank` of `world_size` runs over `count`
    batches: batches rank, rank + W, ... then repeats that do not count, up to ceil(count / W)."""
    if count == 0:
        return []
    per_rank = -(-count // world_size)
    return [(j % count, j < count) for j in range(rank, per_rank * world_size, world_size)]


def sample_batches(job: TrainJob, spec: StageSpec) -> int:
    """How many of the held-out batches are sampled for the stage's sampled metrics."""
    if spec.validation is None:
        return 0
    wanted = job.validation.sample_batches
    wanted = spec.validation.sample_batches if wanted is None else wanted
    return job.validation.batches if wanted is None else min(wanted, job.validation.batches)


def held_out_stream(job: TrainJob, spec: StageSpec, extra_shapes: dict[str, tuple[int, ...]]) -> Iterator[Batch]:
    """Held-out batches of `train.micro_batch_size` with the loss's fields and `extra_shapes`'s."""
    wants = set(spec.fields(job)) | set(extra_shapes)
    size = job.train.micro_batch_size
    if job.data is None:
        shapes = {**spec.field_shapes(job), **extra_shapes}
        return SyntheticLoader({k: shapes[k] for k in wants}, batch_size=size, rank=HELD_OUT_RANK, seed=job.train.seed)
    from data_pipeline.stream import build_loader

    tokenizer = spec.tokenizer(job) if "tokens" in wants else None
    data = job.data.single_pass(job.data.validation)
    try:
        loader = build_loader(data, batch_size=size, want=wants, tokenizer=tokenizer, drop_last=True)
    except ValueError as err:  # the loader names what it reads data.sources[i]: here data.validation[i]
        raise ConfigError(str(err).replace("data.sources", "data.validation")) from None
    return iter(loader)


def read_held_out(stream: Iterator[Batch], count: int, keep: set[int], batch_size: int) -> dict[int, Batch]:
    """Batches `keep` of the first `count` of `stream`; ConfigError if it holds fewer."""
    kept: dict[int, Batch] = {}
    seen = 0
    for index, batch in zip(range(count), stream):
        seen = index + 1
        if index in keep:
            kept[index] = batch
    if seen < count:
        raise ConfigError(
            f"data.validation: holds {seen} full batch(es) of {batch_size}; validation.batches asks for {count} "
            f"(add held-out shards, or lower validation.batches or train.micro_batch_size)"
        )
    return kept


Forward = Callable[..., Any]  # (batch, generator=, measure=None) -> loss, or the measure's values


class Validator:
    """The job's validation as one rank runs it: `due(step)`, then `run(forward)` on every rank."""

    def __init__(self, job: TrainJob, spec: StageSpec, rank: int, world_size: int, device: str) -> None:
        cfg = job.validation
        self.every, self.last_step, self.seed, self.device = cfg.every_steps, job.train.steps, cfg.seed, device
        self.loss_work = assignments(cfg.batches, rank, world_size)
        self.sample_work = assignments(sample_batches(job, spec), rank, world_size)
        self.measure: Optional[Measure] = None
        self.names = [LOSS]
        extra: dict[str, tuple[int, ...]] = {}
        if self.sample_work:
            self.measure = spec.validation.build(job, device, cfg.sample_steps)
            self.names += [name for name, _ in spec.validation.metrics]
            extra = spec.validation.field_shapes(job)
        keep = {i for i, _ in self.loss_work + self.sample_work}
        stream = held_out_stream(job, spec, extra)
        self.batches = read_held_out(stream, cfg.batches, keep, job.train.micro_batch_size)

    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.last_step)

    def generator(self, index: int, stream: int = 0) -> torch.Generator:
        """The fixed generator of held-out batch `index` (stream 0: the loss, 1: the samples)."""
        return torch.Generator(device=self.device).manual_seed((self.seed * 1_000_003 + index) * 2 + stream)

    @torch.no_grad()
    def run(self, forward: Forward) -> dict[str, float]:
        """Collective. `forward` is the stage's module (the DeepSpeed engine) in eval mode:
        `forward(batch, generator=g)` the loss, `forward(batch, generator=g, measure=m)` the
        measure's per-item values. Returns {metric: job-wide mean} (the loss under `loss`)."""
        sums = {name: [0.0, 0.0] for name in self.names}
        for index, counted in self.loss_work:
            loss = forward(self._batch(index), generator=self.generator(index))
            if counted:
                sums[LOSS][0] += float(loss)
                sums[LOSS][1] += 1
        for index, counted in self.sample_work:
            values = forward(self._batch(index), generator=self.generator(index, _SAMPLING), measure=self.measure)
            unknown = set(values) - set(self.names)
            if unknown:
                raise ValueError(f"validation measure returned undeclared metrics {sorted(unknown)}")
            if counted:
                for name, value in values.items():
                    sums[name][0] += float(value.double().sum())
                    sums[name][1] += value.numel()
        flat = dist.all_reduce_sum([x for name in self.names for x in sums[name]])
        return {name: flat[2 * i] / flat[2 * i + 1] for i, name in enumerate(self.names) if flat[2 * i + 1] > 0}

    def _batch(self, index: int) -> Batch:
        return {k: (v.to(self.device) if isinstance(v, Tensor) else v) for k, v in self.batches[index].items()}
