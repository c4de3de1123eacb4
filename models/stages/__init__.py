"""One spec per stage: everything about a stage, in that stage's module.

A module `models/stages/<name>.py` defines `SPEC`, a `StageSpec`: the sections of its job
file beyond the shared training ones (`stage`, `model`, and `clip` where it conditions on
a frozen CLIP), how to build its model, the loss of a batch, the batch fields that loss
reads and their shapes, what must happen before training (the autoregressive prior's PCA
fit), its sample grid, its place in the sampling pipeline and how it loads there, what the
memory plan needs to know, and what its validation measures by sampling held-out batches.
The training loop, the config loader, the memory plan and the sampling loader read specs
and never name a stage: adding a stage is adding a module.

Pure PyTorch like the rest of `models/`: sampling imports this without the trainer.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from typing import Any, Callable, Iterator, Literal, Optional

import torch
from torch import Tensor, nn

from models.clip import ClipExpectation
from models.config import ConfigError, build_config

Batch = dict[str, Any]
Role = Literal["clip", "prior", "decoder", "upsampler"]


@dataclasses.dataclass(frozen=True)
class StageContext:
    """Where a loss runs: this rank and the job's world size (CLIP's loss gathers features)."""

    rank: int = 0
    world_size: int = 1


Loss = Callable[[nn.Module, Batch, Optional[torch.Generator], StageContext], Tensor]
Preparation = Callable[[nn.Module, Iterator[Batch]], None]
# (model, held-out batch, generator) -> {metric: per-item values [B], float32}
Measure = Callable[[nn.Module, Batch, torch.Generator], dict[str, Tensor]]


@dataclasses.dataclass(frozen=True)
class Validation:
    """What a stage measures on held-out batches by sampling from the model, beyond the loss
    that every stage's validation computes (trainer/validation.py runs both).

    `metrics`: (name, meaning with its unit) pairs, exported as `unclip_validation_<name>`;
    each name starts with the stage's name. A measure returns per-item values, so the job's
    figure is an exact mean over every rank's items.
    """

    metrics: tuple[tuple[str, str], ...]
    # (cfg, device, sample_steps) -> the measure, made once per run (e.g. loads a frozen CLIP)
    build: Callable[[Any, str, int], Measure]
    # cfg -> per-sample shapes of the batch fields the measure reads beyond the loss's
    field_shapes: Callable[[Any], dict[str, tuple[int, ...]]] = lambda cfg: {}
    # held-out batches sampled when the job leaves `validation.sample_batches` unset
    # (None: all of them)
    sample_batches: Optional[int] = None


def load_weights(model: nn.Module, state: dict[str, Tensor], where: str) -> nn.Module:
    """`model` with `state` loaded (every parameter and persistent buffer must be there and fit)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{where}: weights do not match the {type(model).__name__} model "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]})"
        )
    model.load_state_dict(state)
    return model


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """What the rest of the system knows about one stage.

    Every callable takes the stage's config (`config`, or a training job that extends it).
    """

    name: str
    config: type  # the stage's own job sections: `stage: Literal[name]`, `model`, maybe `clip`
    build: Callable[..., nn.Module]  # (cfg, *, activation_checkpointing=False) -> model, pure PyTorch
    loss: Loss  # (model, batch, generator, context) -> float32 scalar
    fields: Callable[[Any], frozenset[str]]  # cfg -> batch keys the loss reads
    field_shapes: Callable[[Any], dict[str, tuple[int, ...]]]  # cfg -> per-sample shape of each field
    role: Role  # its place in the sampling pipeline
    # cfg -> what runs once before the first step (rank 0, on one pass over the training
    # data: its iterator ends where the data does), or None
    preparation: Callable[[Any], Optional[Preparation]] = lambda cfg: None
    # cfg -> the batch fields the preparation reads (default: the loss's `fields`)
    preparation_fields: Optional[Callable[[Any], frozenset[str]]] = None
    # (model, batch, generator) -> rows of images [n, 3, H, W] in [-1, 1] for RUN_DIR/samples/
    sample_grid: Optional[Callable[[nn.Module, Batch, torch.Generator], list[Tensor]]] = None
    # cfg -> the precomputed CLIP embeddings it reads, as its config states them (the preflight
    # checks them against what precompute recorded); None: it reads no embeddings
    embeddings: Optional[Callable[[Any], ClipExpectation]] = None
    # cfg -> the tokenizer (captions -> LongTensor [B, L]) that makes the `tokens` field
    tokenizer: Optional[Callable[[Any], Callable[[list[str]], Tensor]]] = None
    # (cfg, weights, device) -> the module the pipeline calls (default: build + load + eval)
    load: Optional[Callable[[Any, dict[str, Tensor], str], Any]] = None
    # (model, cfg, micro_batch) -> the training loss on `meta` tensors, for stages whose own
    # loss cannot run there (the memory plan; default: `loss` on a batch of `field_shapes`)
    meta_loss: Optional[Callable[[nn.Module, Any, int], Tensor]] = None
    # its sampled validation metrics (the prior's embedding cosines, the decoder's CLIP score)
    validation: Optional[Validation] = None

    def stage_config(self, data: dict[str, Any], source: str = "") -> Any:
        """The stage's sections of a (possibly whole) job config dict, validated."""
        own = {f.name for f in dataclasses.fields(self.config)}
        return build_config(self.config, {k: v for k, v in data.items() if k in own}, source=source)

    def load_for_sampling(self, cfg: Any, weights: dict[str, Tensor], device: str = "cpu", where: str = "") -> Any:
        """The stage as the sampling pipeline uses it, with `weights`, in eval mode on `device`."""
        if self.load is not None:
            return self.load(cfg, weights, device)
        model = load_weights(self.build(cfg), weights, where or f"{self.name} weights")
        return model.to(device).eval()


@functools.cache
def names() -> tuple[str, ...]:
    """Every stage: the modules of this package."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def get(name: str) -> StageSpec:
    """The spec of stage `name`; ConfigError naming the stages there are otherwise."""
    if name not in names():
        raise ConfigError(f"stage: expected one of {', '.join(names())} (got {name!r})")
    return importlib.import_module(f"{__name__}.{name}").SPEC
