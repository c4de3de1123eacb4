"""Load DeepSpeed's checkpoint files without unpickling arbitrary objects.

DeepSpeed stores its states (`*_model_states.pt`, `*_optim_states.pt`, the universal form's
`zero/*/*.pt`) with `torch.save` and reads them back with `torch.load(weights_only=False)`,
so whoever can write `RUN_DIR/checkpoints` could run code in every rank that resumes. Here
every such load is `torch.load(weights_only=True)`: tensors, containers and numbers, plus the
four DeepSpeed classes below, whose instances may carry only numbers afterwards.

- `WeightsOnlyCheckpointEngine`: the checkpoint engine `trainer/engine.py` installs; DeepSpeed
  reads the model and ZeRO shards of a checkpoint through it.
- `weights_only_loads()`: while DeepSpeed loads a checkpoint, its direct `torch.load` calls
  (the universal-checkpoint readers, `zero_to_fp32`) go through the same loader.
- `python -m trainer.safe_load ds_to_universal ARGS`: DeepSpeed's converter under it.

A file that needs anything else (or is torn) raises `UnsafeFileError` naming the file; nothing
in it runs.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import runpy
import sys
from typing import Any, Iterator, Optional, Sequence

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# The only non-torch globals a DeepSpeed 0.19 checkpoint of ours needs (found by saving real
# ZeRO 0/1/2/3 checkpoints in fp32 and bf16 with this trainer, converting them to universal
# form, and listing `torch.serialization.get_unsafe_globals_in_checkpoint` of every file;
# model-state files need none):
ALLOWED_GLOBALS = (
    # ZeRO 1-3 optimizer shards and universal `zero/optimizer_state.pt`: the optimizer's
    # `loss_scaler` (fp32/bf16: a static scale of 1.0) is pickled as an object.
    LossScaler,
    # The same slot under fp16 with dynamic loss scaling (our `loss_scale: 0`); from reading
    # DeepSpeed's `CreateLossScaler`: fp16 does not run on CPU, so no saved file showed it.
    DynamicLossScaler,
    # ZeRO 1/2 optimizer shards: `param_slice_mappings`, each parameter's (numel, start)
    # in the flat partition.
    fragment_address,
    # ZeRO 1-3 optimizer shards: `zero_stage`, an int Enum.
    ZeroStageEnum,
)
# Attribute values an instance of those classes may have once loaded: unpickling sets its
# `__dict__` from the file, and DeepSpeed then calls its methods, so nothing callable.
_PLAIN = (bool, int, float, type(None), torch.dtype)
_FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_torch_load = torch.load  # the real one, whatever weights_only_loads() puts in its place


class UnsafeFileError(RuntimeError):
    """A checkpoint file that a weights-only load refused (an object outside the allow-list) or
    could not read (torn, not a torch file); nothing in it ran."""


def load_weights_only(f: Any, map_location: Any = None, mmap: Optional[bool] = None) -> Any:
    """`torch.load(f, weights_only=True)` allowing exactly `ALLOWED_GLOBALS`; UnsafeFileError
    (naming `f`) for anything else."""
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            obj = _torch_load(f, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UnsafeFileError(f"{_name(f)}: refused by a weights-only load: {_reason(err)}") from None
    except FileNotFoundError:
        raise  # DeepSpeed's business (it looks for optional files)
    except (RuntimeError, EOFError, ValueError, OSError) as err:  # torn, or not a torch file at all
        raise UnsafeFileError(f"{_name(f)}: unreadable: {_reason(err)}") from None
    problem = _non_plain_field(obj)
    if problem:
        raise UnsafeFileError(f"{_name(f)}: {problem}")
    return obj


_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _reason(err: BaseException) -> str:
    """The line of torch's (long, advisory) message that says what was wrong."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    found = [line for line in lines if "GLOBAL" in line] or [line for line in lines if not line.startswith(_ADVICE)]
    reason = (found or lines or [type(err).__name__])[0].removeprefix("WeightsUnpickler error: ")
    return reason.split(" was not an allowed global")[0][:300]


def _non_plain_field(obj: Any) -> str:
    """Why `obj` holds an allowed DeepSpeed object with a non-numeric attribute, or ''."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, ALLOWED_GLOBALS) and not isinstance(item, ZeroStageEnum):
            for key, value in vars(item).items():
                if not isinstance(value, _PLAIN):
                    return f"a {type(item).__name__} whose {key!r} is a {type(value).__name__}, not a number"
    return ""


def _name(f: Any) -> str:
    return os.fspath(f) if isinstance(f, (str, os.PathLike)) else repr(f)


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's default checkpoint engine (same files, same save) with a weights-only load."""

    def load(self, path: str, map_location=None):
        return load_weights_only(path, map_location=map_location)


def install(engine: Any) -> None:
    """Make `engine` (a DeepSpeedEngine) read checkpoints through `WeightsOnlyCheckpointEngine`.

    Only DeepSpeed's default engine is replaced; another one (chosen through `deepspeed.extra`)
    still loads under `weights_only_loads()`, which `Checkpoints.load_engine` always uses.
    """
    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)


def _forced_load(f: Any, map_location: Any = None, pickle_module: Any = None, *, weights_only: Any = None,
                 mmap: Optional[bool] = None, **_: Any) -> Any:
    # DeepSpeed's own calls pass weights_only=False; that choice is not theirs to make here
    return load_weights_only(f, map_location=map_location, mmap=mmap)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """While active, every `torch.load` in this process is `load_weights_only`.

    DeepSpeed's universal-checkpoint readers call `torch.load(..., weights_only=False)`
    directly, not through the checkpoint engine. Swapping `torch.load` catches those calls
    and names the file on refusal; torch's own force switch (the environment variable) is
    the backstop for any reference bound before the swap. Meant for the main thread while it
    loads a checkpoint: nothing else in the trainer calls `torch.load`.
    """
    saved_env = os.environ.get(_FORCE_ENV)
    os.environ[_FORCE_ENV] = "1"
    torch.load = _forced_load
    try:
        yield
    finally:
        torch.load = _torch_load
        if saved_env is None:
            os.environ.pop(_FORCE_ENV, None)
        else:
            os.environ[_FORCE_ENV] = saved_env


# Exit status of the converter below when it refused a file (its last stderr line says which).
REFUSED = 3


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m trainer.safe_load ds_to_universal ARGS`: DeepSpeed's `ds_to_universal` with
    every load weights-only (it reads every model and optimizer shard of the checkpoint)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "ds_to_universal":
        print("usage: python -m trainer.safe_load ds_to_universal ARGS", file=sys.stderr)
        return 2
    sys.argv = ["ds_to_universal", *argv[1:]]
    try:
        with weights_only_loads():
            runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__")
    except UnsafeFileError as err:
        print(f"refused: {err}", file=sys.stderr, flush=True)
        return REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
