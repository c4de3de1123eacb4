"""Typed configs of the data path: training data sources and the CLIP precompute job."""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any, Literal, Optional, Union
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field

from models.clip import ClipConfig
from models.config import NonNegativeInt, PositiveFloat, PositiveInt, config_dataclass


# Option names that carry secrets in s3fs, gcsfs, adlfs and botocore's client settings.
_CREDENTIAL_KEYS = re.compile(
    r"^(key|secret|password|token|session_token|credentials?|client_secret|account_key|sas_token|"
    r"connection_string|aws_access_key_id|aws_secret_access_key|aws_session_token)$", re.IGNORECASE)
# gcsfs's `token` also takes these modes, which name where to look rather than a secret
_TOKEN_MODES = {"anon", "google_default", "cloud", "cache", "browser"}


def _no_credentials(options: dict[str, Any], where: str = "") -> dict[str, Any]:
    for name, value in options.items():
        key = f"{where}{name}"
        if isinstance(value, dict):
            _no_credentials(value, f"{key}.")
        elif _CREDENTIAL_KEYS.match(str(name)) and not (name == "token" and value in _TOKEN_MODES):
            raise ValueError(f"{key}: credentials do not belong in the config (it is saved in the run directory "
                             f"and in exported weights); let the backend find them: AWS_ACCESS_KEY_ID/"
                             f"AWS_SECRET_ACCESS_KEY or AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS, ...")
        elif isinstance(value, str) and "://" in value and "@" in urlsplit(value).netloc:
            raise ValueError(f"{key}: a URL with credentials in it; let the backend find them instead "
                             f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...)")
    return options


# fsspec storage options of one location, e.g. {endpoint_url: "https://minio.internal:9000"} for
# an S3-compatible store (MinIO, Ceph, R2) or {anon: true} for a public bucket. Never secrets.
StorageOptions = Annotated[dict[str, Any], AfterValidator(_no_credentials)]


@config_dataclass
class SourceConfig:
    """One data source: webdataset image shards (and their aligned embedding shards), or a
    clip-retrieval embedding folder (`img_emb/`, `text_emb/`, `metadata/`)."""

    shards: Union[str, list[str]]  # fsspec URL, brace pattern, or list of them
    embeddings: Optional[Union[str, list[str]]] = None
    weight: PositiveFloat = 1.0
    format: Literal["webdataset", "clip-retrieval"] = "webdataset"
    storage_options: StorageOptions = Field(default_factory=dict)  # for its shards and embeddings


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
    storage_options: StorageOptions = Field(default_factory=dict)  # for the input shards
    out_storage_options: Optional[StorageOptions] = None  # for `out`; None: the same as the input's
    batch_size: PositiveInt = 256
    text_encodings: bool = False
    num_workers: NonNegativeInt = 2
    device: Optional[str] = None  # None: cuda if available, else cpu
    # clip-retrieval: also write OUT/img_emb, text_emb, metadata (data_pipeline.clip_retrieval_export)
    format: Literal["webdataset", "clip-retrieval"] = "webdataset"
