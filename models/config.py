"""Typed, validated configuration objects shared by every package.

Configs are pydantic dataclasses: they behave like ordinary dataclasses (build them in
Python with keyword arguments), and building one from a dict rejects unknown keys, wrong
types and out-of-range values with an error that names the dotted key. Pure Python: reading
YAML files lives in `launch/config_files.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, TypeVar

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

T = TypeVar("T")

# Shorthands for bounded fields; pydantic reports the bound that failed.
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]


def config_dataclass(cls: type[T]) -> type[T]:
    """Make `cls` a validated, keyword-only dataclass that forbids unknown keys."""
    return _pydantic_dataclass(cls, config=ConfigDict(extra="forbid", validate_assignment=True), kw_only=True)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and what was expected."""


def _dotted(loc: tuple[Any, ...]) -> str:
    # union members are tagged "kind=..." by their discriminator: not a key the user wrote
    keys = [str(part) for part in loc if not (isinstance(part, str) and "=" in part)]
    return ".".join(keys) or "<root>"


def format_validation_error(err: ValidationError, source: str = "") -> str:
    lines = []
    for item in err.errors(include_url=False):
        key = _dotted(tuple(item["loc"]))
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "unexpected_keyword_argument":
            msg = "unknown key (check the spelling or remove it)"
        elif item["type"] == "missing_argument" or item["type"] == "missing":
            msg = "required key is missing"
        got = item.get("input")
        shown = "" if item["type"] in ("missing_argument", "missing") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {msg}{shown}")
    where = f" in {source}" if source else ""
    return f"invalid config{where}:\n" + "\n".join(lines)


def build_config(cls: Any, data: Any, source: str = "") -> Any:
    """Validate `data` (nested dicts from YAML/JSON) into `cls`; raise ConfigError on any problem."""
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (JSON/YAML-safe) of a config dataclass; tuples become lists."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` wins; nested mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
