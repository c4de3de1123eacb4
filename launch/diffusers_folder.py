"""Reading and writing a diffusers pipeline folder (what `save_pretrained` writes and
`from_pretrained` reads): `model_index.json`, one subfolder per component with its
`config.json` (`scheduler_config.json` for schedulers) and weights, the tokenizer's files.

Weights are read from `*.safetensors` (sharded with an index too), or from PyTorch `.bin`
files with `weights_only=True` (tensors only, never arbitrary pickles); an `fp16` variant is
used when it is all a component has. Writing uses safetensors only.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


class FolderError(ValueError):
    """The folder is not a readable diffusers pipeline (what is missing or broken, and where)."""


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FolderError(f"{path}: missing") from None
    except (OSError, ValueError) as err:
        raise FolderError(f"{path}: not readable JSON ({err})") from None


def read_model_index(folder: Path, pipeline: str, components: tuple[str, ...]) -> dict[str, Any]:
    """`model_index.json`, checked to name `pipeline` and every one of `components`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FolderError(f"{folder}: not a directory")
    index = read_json(folder / "model_index.json")
    if index.get("_class_name") != pipeline:
        raise FolderError(f"{folder}/model_index.json: _class_name is {index.get('_class_name')!r}, expected {pipeline!r}")
    missing = [c for c in components if c not in index or not (folder / c).is_dir()]
    if missing:
        raise FolderError(f"{folder}: components missing: {', '.join(missing)}")
    return index


def _weight_files(component: Path) -> list[Path]:
    for variant in ("", ".fp16"):
        for name in _WEIGHT_NAMES:
            for ext in ("safetensors", "bin"):
                single = component / f"{name}{variant}.{ext}"
                if single.is_file():
                    return [single]
                index = component / f"{name}{variant}.{ext}.index.json"
                if index.is_file():
                    shards = sorted(set(read_json(index).get("weight_map", {}).values()))
                    return [component / s for s in shards]
    raise FolderError(f"{component}: no weights ({'/'.join(_WEIGHT_NAMES)}[.fp16].safetensors or .bin)")


def read_weights(component: Path) -> dict[str, Tensor]:
    """The component's state dict, float32."""
    state: dict[str, Tensor] = {}
    for path in _weight_files(Path(component)):
        try:
            part = load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # safetensors and torch raise several types on a broken file
            raise FolderError(f"{path}: unreadable weights ({err})") from None
        state.update(part)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def read_component(folder: Path, name: str, *, scheduler: bool = False) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """`(config, state dict)` of component `name` (a scheduler has no weights: `{}`)."""
    component = Path(folder) / name
    if scheduler:
        return read_json(component / "scheduler_config.json"), {}
    return read_json(component / "config.json"), read_weights(component)


def write_component(
    folder: Path, name: str, config: dict[str, Any], state: dict[str, Tensor] | None = None, *, weights_name: str = "diffusion_pytorch_model"
) -> None:
    """`folder/name/config.json` (or `scheduler_config.json` when `state` is None) and the
    weights as `<weights_name>.safetensors`."""
    component = Path(folder) / name
    component.mkdir(parents=True, exist_ok=True)
    config_name = "scheduler_config.json" if state is None else "config.json"
    (component / config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if state is not None:
        save_file({k: v.contiguous() for k, v in state.items()}, component / f"{weights_name}.safetensors", metadata={"format": "pt"})


def openai_bpe_files() -> tuple[dict[str, int], list[str]]:
    """OpenAI CLIP's byte-level BPE as Hugging Face's `CLIPTokenizer` files hold it:
    `(vocab {token: id}, merges)`, built from open_clip's copy of the same merges, so the two
    tokenizers give the same ids (start 49406, end 49407)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def write_clip_tokenizer(folder: Path, context_length: int) -> None:
    """`folder/tokenizer/`: OpenAI's CLIP tokenizer in `CLIPTokenizer`'s file layout
    (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json), padding with
    the end-of-text token like OpenAI's."""
    vocab, merges = openai_bpe_files()
    out = Path(folder) / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": int(context_length), "do_lower_case": True, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def check_clip_tokenizer(folder: Path) -> None:
    """Raise FolderError unless `folder/tokenizer` is OpenAI's CLIP BPE (what open_clip's
    tokenizer, which unclip runs, implements)."""
    tokenizer = Path(folder) / "tokenizer"
    vocab_path = tokenizer / "vocab.json"
    if vocab_path.is_file():
        vocab = read_json(vocab_path)
    elif (tokenizer / "tokenizer.json").is_file():
        vocab = read_json(tokenizer / "tokenizer.json").get("model", {}).get("vocab", {})
    else:
        raise FolderError(f"{tokenizer}: neither vocab.json nor tokenizer.json")
    ours, _ = openai_bpe_files()
    same = len(vocab) == len(ours) and all(vocab.get(t) == i for t, i in ours.items())
    if not same:
        raise FolderError(f"{tokenizer}: not OpenAI's CLIP BPE vocabulary ({len(vocab)} tokens; unclip tokenizes with open_clip's copy of it)")


def check_empty(out: Path, name: str) -> None:
    """FileExistsError (naming `name`) where `out` exists and is not an empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{name} exists and is not an empty folder (nothing was written)")


@contextlib.contextmanager
def new_folder(out: Path, name: str) -> Iterator[Path]:
    """The folder `out`, written whole or not at all: the block fills a temporary sibling,
    renamed to `out` when it succeeds and removed when it fails."""
    check_empty(out, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
