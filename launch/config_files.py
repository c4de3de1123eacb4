"""Job config files: safe YAML, `base:` inheritance, `--set` overrides, validation.

A job file names its `stage`: a training stage's spec (`models/stages/`) with the shared
training sections makes its typed config class; `precompute` is the CLIP embedding job. `base:` (a path, or a
list of paths, relative to the file) is merged first, so paper-scale and demo configs share
one definition of each stage. Values given with `--set dotted.key=value` are parsed as YAML
data (never as objects) and applied last. Nothing here runs before validation succeeds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from data_pipeline.config import PrecomputeConfig
from models import stages
from models.config import ConfigError, build_config, config_to_dict, deep_merge
from trainer.config import job_class

# jobs that are not a training stage
DATA_JOBS: dict[str, type] = {"precompute": PrecomputeConfig}


class _Loader(yaml.SafeLoader):
    """SafeLoader (no object tags) that reads `1e-4` as a float and refuses duplicate keys."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise ConfigError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
        seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys, got {type(data).__name__}")
    return data


def load_raw(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's mapping with its `base:` files merged under it (recursively)."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"config inheritance cycle: {cycle}")
    data = _read(path)
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: base: expected a path or a list of paths, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_raw(path.parent / base, (*_chain, path)))
    return deep_merge(merged, data)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` in place; the value is YAML data (`3`, `true`, `[1, 2]`)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value")
    parts = key.strip().split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"--set {key}: {where} is a value ({child!r}), not a section")
        node = child
    node[parts[-1]] = parse_yaml(text, f"--set {key}") if text.strip() else ""


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Any:
    """Read, merge, override and validate a job file into its typed config (by `stage`)."""
    data = load_raw(path)
    for assignment in overrides:
        apply_override(data, assignment)
    return build_job(data, source=str(path))


def job_config_class(stage: Any, source: str = "") -> type:
    """The config class of a job whose `stage:` is `stage`."""
    if stage in DATA_JOBS:
        return DATA_JOBS[stage]
    if stage in stages.names():
        return job_class(stages.get(stage))
    expected = ", ".join(sorted((*stages.names(), *DATA_JOBS)))
    raise ConfigError(f"invalid config in {source}:\n  stage: expected one of {expected} (got {stage!r})")


def build_job(data: dict[str, Any], source: str = "") -> Any:
    return build_config(job_config_class(data.get("stage"), source), data, source=source)


def dump_config(job: Any) -> str:
    """The resolved config as YAML; loading it again gives an equal config."""
    data = config_to_dict(job)
    head = {"stage": data.pop("stage")} if "stage" in data else {}
    return yaml.safe_dump({**head, **data}, sort_keys=False)
