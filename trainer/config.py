"""Job configs of the training stages: one YAML file per job, validated into these classes.

Every stage shares the loop, optimiser, DeepSpeed, checkpoint and metrics sections (here);
what differs, the `model` section (and, for stages conditioned on a frozen CLIP, `clip`),
is the stage's own, declared by its spec in `models/stages/`.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Annotated, Any, Literal, Optional

from pydantic import Field

from data_pipeline.config import DataConfig
from models.config import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    config_dataclass,
)
from models.stages import StageSpec
from trainer.monitors import MONITOR_PACKAGES


@config_dataclass
class LoopConfig:
    steps: PositiveInt = 1000  # optimizer steps
    micro_batch_size: PositiveInt = 32  # per rank, per forward
    grad_accum: PositiveInt = 1
    seed: int = 0
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.999
    log_every: PositiveInt = 10
    sample_every: NonNegativeInt = 0  # 0: no sample grids during training
    max_consecutive_nonfinite: PositiveInt = 10
    # torch.use_deterministic_algorithms: None = on for CPU jobs (bit-identical resume, the
    # tests), off on GPUs, where the deterministic kernels (e.g. scatter, some convolution
    # backwards) are slower and nondeterminism is only rounding
    deterministic: Optional[bool] = None
    # torch.compile backend for the stage's model ("inductor" is torch's default), or None
    # (eager). ZeRO 0-2; ZeRO-3's parameter hooks need DeepSpeed's own compiler.
    compile: Optional[str] = None


@config_dataclass
class OptimConfig:
    lr: PositiveFloat = 1e-4
    weight_decay: NonNegativeFloat = 0.0
    betas: tuple[Probability, Probability] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    warmup_steps: NonNegativeInt = 0
    schedule: Literal["constant", "cosine"] = "cosine"
    min_lr_ratio: Probability = 0.0
    grad_clip: NonNegativeFloat = 1.0  # 0 disables clipping


@config_dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    # auto: bf16 where CUDA is present, fp32 on CPU (bf16 is no faster there)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    activation_checkpointing: bool = False
    timeout_s: PositiveFloat = 600.0  # collectives (init and per step)
    extra: dict[str, Any] = Field(default_factory=dict)  # merged last into the DeepSpeed JSON

    def __post_init__(self) -> None:
        # DeepSpeed imports a monitor's package only when its engine starts, on rank 0: say so now
        for section, package in MONITOR_PACKAGES.items():
            monitor = self.extra.get(section)
            if isinstance(monitor, dict) and monitor.get("enabled") and importlib.util.find_spec(package) is None:
                raise ValueError(f"deepspeed.extra.{section}: needs the {package} package (pip install {package})")


@config_dataclass
class CheckpointConfig:
    every_steps: Optional[PositiveInt] = 1000  # None: by time only
    # also every this many minutes (all ranks agree: any rank's clock due saves on all), for
    # jobs whose step time is not known in advance
    every_minutes: Optional[PositiveFloat] = None
    keep_last: PositiveInt = 3


@config_dataclass
class MetricsConfig:
    port: Optional[Annotated[int, Field(ge=1, le=65535)]] = None
    host: str = "127.0.0.1"
    pushgateway: Optional[str] = None
    peak_flops: Optional[PositiveFloat] = None  # per device, FLOP/s; measured at start if unset
    # every rank also serves its own series on port + local rank; None: the environment
    # variable UNCLIP_METRICS_PER_RANK decides (it reaches every rank of any launcher)
    per_rank: Optional[bool] = None


@config_dataclass
class ValidationConfig:
    """Validation on fixed held-out batches (`data.validation`; synthetic ones for a job
    without `data:`): the stage's loss with fixed timesteps and noise, and what the stage's
    spec measures by sampling (`StageSpec.validation`)."""

    every_steps: NonNegativeInt = 0  # 0: no validation; else every N steps and at the last
    batches: PositiveInt = 4  # held-out batches of train.micro_batch_size, shared out over the ranks
    # of those, how many are also sampled for the stage's sampled metrics; None: the stage's default
    sample_batches: Optional[NonNegativeInt] = None
    sample_steps: PositiveInt = 16  # diffusion steps of those samples (the stage's sampler)
    seed: int = 0  # the held-out batches' timesteps and noise


@config_dataclass
class TrainJob:
    """Sections shared by every training stage; a stage's own (`stage`, `model`, ...) come
    from its spec (`job_class`)."""

    name: str = "unclip"
    data: Optional[DataConfig] = None
    train: LoopConfig = Field(default_factory=LoopConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    # A fresh run's initial weights: an `unclip export` file (e.g. from `unclip import`) or a
    # run directory (its latest checkpoint's EMA). Ignored once the run has a checkpoint of
    # its own, which it resumes from (`trainer/init_from.py`).
    init_from: Optional[str] = None
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        if self.validation.every_steps and self.data is not None and not self.data.validation:
            raise ValueError(
                "validation.every_steps needs held-out data: set data.validation (sources like data.sources, "
                "never trained on), or validation.every_steps: 0"
            )


@functools.cache
def job_class(spec: StageSpec) -> type:
    """The job config of a training stage: the spec's own sections and the shared ones.

    One class per stage, made once: `job_class(stages.get("decoder"))` has `stage`, `model`
    and `clip` from `models/stages/decoder.py` and `train`, `optim`, ... from here.
    """
    name = spec.config.__name__.removesuffix("StageConfig") + "Job"
    doc = f"A {spec.name} training job: {spec.config.__name__}'s sections and TrainJob's."
    bases = (spec.config, TrainJob)

    def __post_init__(self) -> None:  # every base's checks: the MRO alone would run only the first
        for base in bases:
            check = base.__dict__.get("__post_init__")
            if check is not None:
                check(self)

    namespace = {"__module__": __name__, "__doc__": doc, "__post_init__": __post_init__}
    return config_dataclass(type(name, bases, namespace))
