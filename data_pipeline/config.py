"""Typed configs of the data path: training data sources and the CLIP precompute job."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Union

from pydantic import Field

from models.clip import ClipConfig
from models.config import NonNegativeInt, PositiveFloat, PositiveInt, config_dataclass


@config_dataclass
class SourceConfig:
    """One data source: webdataset image shards (and their aligned embedding shards), or a
    clip-retrieval embedding folder (`img_emb/`, `text_emb/`, `metadata/`)."""

    shards: Union[str, list[str]]  # fsspec URL, brace pattern, or list of them
    embeddings: Optional[Union[str, list[str]]] = None
    weight: PositiveFloat = 1.0
    format: Literal["webdataset", "clip-retrieval"] = "webdataset"


@config_dataclass
class DataConfig:
    sources: list[SourceConfig] = Field(min_length=1)
    # held-out sources (never trained on) for the job's validation (`validation:`), same form
    validation: list[SourceConfig] = Field(default_factory=list)
    resampled: bool = True
    shuffle_buffer: NonNegativeInt = 1000
    num_workers: NonNegativeInt = 2
    image_size: Optional[PositiveInt] = None
    seed: int = 0

    def single_pass(self, sources: Optional[list[SourceConfig]] = None) -> "DataConfig":
        """This data (or `sources`, read the same way) as one pass in a fixed order, decoded in
        the reading process: what a job reads once, before training (a fit, a held-out set)."""
        chosen = list(self.sources if sources is None else sources)
        return dataclasses.replace(self, sources=chosen, validation=[], resampled=False, num_workers=0)


@config_dataclass
class PrecomputeConfig:
    stage: Literal["precompute"] = "precompute"
    clip: ClipConfig = Field(default_factory=ClipConfig)
    shards: Union[str, list[str]] = ""
    out: str = ""
    batch_size: PositiveInt = 256
    text_encodings: bool = False
    num_workers: NonNegativeInt = 2
    device: Optional[str] = None  # None: cuda if available, else cpu
