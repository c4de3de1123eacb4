"""Model FLOPs for MFU: counted on one real training step, and the device's peak FLOP/s.

Why count instead of the "3 x forward" rule: our stages freeze parts (the CLIP encoders
that the decoder and prior jobs run on the fly), and a frozen module costs a forward but
no backward, while activation checkpointing adds a second forward. `FlopCounterMode` sees the ops that actually run, so
the count is right whatever is frozen.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

T = TypeVar("T")


def counted(step: Callable[[], T]) -> tuple[T, int]:
    """Run `step()` once under the FLOP counter: (its result, the FLOPs it ran).

    Counts only what torch's flop counter knows (matmuls, convolutions, SDPA), which is
    what "model FLOPs" means for MFU; elementwise ops are not counted. Works around a
    DeepSpeed engine's forward + backward too, so the trainer can count its first real
    micro batch instead of running an extra one:
        loss, flops = counted(lambda: forward_backward(batch))
        flops_per_sample = flops / micro_batch_size
    """
    counter = FlopCounterMode(display=False)
    # eager even where the model is compiled (train.compile): the same FLOPs, and no second
    # compilation for a dispatch mode that is on for this one step only
    with torch.compiler.set_stance("force_eager"), counter:
        result = step()
    return result, int(counter.get_total_flops())


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of the matmul/conv/attention ops run by `step()` (e.g. forward + backward)."""
    return counted(step)[1]


def flops_per_sample(
    model: torch.nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    batch_size: int,
) -> float:
    """Model FLOPs of one training sample: one forward + backward of `loss_fn()` / batch.

    `loss_fn` computes the loss of one micro batch of `batch_size` samples with `model`
    (the plain module, not a DeepSpeed engine: no optimiser state is touched). Gradients
    are cleared afterwards so the count leaves no trace in the next real step.
    """
    if batch_size <= 0:
        raise ValueError(f"flops_per_sample: batch_size must be positive (got {batch_size})")

    def step() -> None:
        loss = loss_fn()
        if loss.requires_grad:
            loss.backward()

    total = count_flops(step)
    model.zero_grad(set_to_none=True)
    return total / batch_size


def default_peak_dtype(device: torch.device) -> torch.dtype:
    # Training runs bf16 on CUDA and fp32 on CPU ("auto" precision), so that is the peak
    # the model can reach; a config `metrics.peak_flops` overrides the measurement.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def measure_peak_flops(
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    seconds: float = 0.25,
    size: Optional[int] = None,
) -> float:
    """Achieved FLOP/s of square matmuls on `device`: a practical peak for MFU.

    Runs `size x size` matmuls for about `seconds` after one warm-up and returns
    2 * size^3 * iterations / elapsed. Below a datasheet peak (clocks, power), so the MFU
    it gives is "fraction of what this device does on a dense matmul", stated as such.
    """
    device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    dtype = dtype or default_peak_dtype(device)
    size = size or (8192 if device.type == "cuda" else 512)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.matmul(a, b)
    sync()
    iterations, start = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        iterations += 1
        if iterations % 4 == 0:
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    return 2.0 * size**3 * iterations / elapsed
