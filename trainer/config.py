"""Job configs of the training stages: one YAML file per job, validated into these classes.

Every stage shares the loop, optimiser, DeepSpeed, checkpoint and metrics sections; what
differs is the `model` section (and, for image-conditioned stages, the frozen CLIP).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag

from data_pipeline.config import DataConfig
from models.clip import ClipConfig
from models.config import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    config_dataclass,
)
from models.decoder import DecoderConfig, UpsamplerConfig
from models.prior import ARPriorConfig, DiffusionPriorConfig


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


def _model_kind(value: Any) -> str:
    kind = value.get("kind", "diffusion") if isinstance(value, dict) else getattr(value, "kind", None)
    return f"kind={kind}"


PriorModelConfig = Annotated[
    Union[
        Annotated[DiffusionPriorConfig, Tag("kind=diffusion")],
        Annotated[ARPriorConfig, Tag("kind=autoregressive")],
    ],
    Discriminator(
        _model_kind,
        custom_error_type="invalid_kind",
        custom_error_message="model.kind must be 'diffusion' or 'autoregressive'",
    ),
]


@config_dataclass
class TrainJob:
    """Sections shared by every training stage."""

    name: str = "unclip"
    data: Optional[DataConfig] = None
    train: LoopConfig = Field(default_factory=LoopConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)


@config_dataclass
class ClipJob(TrainJob):
    """Contrastive training of a small CLIP (the demo's: no pretrained weights offline)."""

    stage: Literal["clip"] = "clip"
    model: ClipConfig = Field(default_factory=ClipConfig)


@config_dataclass
class PriorJob(TrainJob):
    stage: Literal["prior"] = "prior"
    model: PriorModelConfig = Field(default_factory=DiffusionPriorConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)


@config_dataclass
class DecoderJob(TrainJob):
    stage: Literal["decoder"] = "decoder"
    model: DecoderConfig = Field(default_factory=DecoderConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)


@config_dataclass
class UpsamplerJob(TrainJob):
    stage: Literal["upsampler"] = "upsampler"
    model: UpsamplerConfig = Field(default_factory=UpsamplerConfig)


TRAIN_JOBS: dict[str, type] = {
    "clip": ClipJob,
    "prior": PriorJob,
    "decoder": DecoderJob,
    "upsampler": UpsamplerJob,
}
