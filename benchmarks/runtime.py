"""Where and how a benchmark runs: the device, its precision, and one model ready to time.

CPU runs fp32 (bf16 is no faster on this CPU); CUDA runs bf16 autocast over fp32 weights,
the same for both implementations. A `Bench` is one model of one implementation with its
optimizer and its inputs already made, exposing the three things the tables time: a training
step (forward + backward + AdamW), the training loss alone (for FLOP counting), and sampling.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import torch
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # "fp32" | "bf16"

    @classmethod
    def for_device(cls, device: str) -> "Runtime":
        dev = torch.device(device)
        return cls(dev, "bf16" if dev.type == "cuda" else "fp32")

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def matmul_burst(self) -> tuple[Callable[[], None], float]:
        """A burst of large square matmuls in the training dtype and its FLOPs: timed between
        the training runs, it gives the machine's peak under the same load as they saw."""
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        size, count = (8192, 16) if self.device.type == "cuda" else (1536, 4)
        a = torch.randn(size, size, device=self.device, dtype=dtype)
        b = torch.randn(size, size, device=self.device, dtype=dtype)

        def burst() -> None:
            for _ in range(count):
                torch.mm(a, b)
            self.sync()

        return burst, 2.0 * size**3 * count

    def describe(self) -> str:
        if self.device.type == "cuda":
            return f"{torch.cuda.get_device_name(self.device)}, {self.precision} autocast"
        return f"CPU, {torch.get_num_threads()} threads, {self.precision}"


@dataclasses.dataclass
class Bench:
    impl: str  # "ours" | "dalle2-pytorch"
    model: nn.Module
    loss_fn: Callable[[], Tensor]  # one training batch -> scalar loss (training mode)
    sample_fn: Callable[[], Tensor]  # one sampling batch, DDIM, no grad
    runtime: Runtime
    optimizer: torch.optim.Optimizer = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.model.to(self.runtime.device).train()
        # the same optimizer for both implementations: it is not what is being compared. Fused
        # (one kernel per tensor): the foreach version's many small kernels each wait for a core
        # on a shared machine, which measures the load, not the models.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def loss(self) -> Tensor:
        with self.runtime.autocast():
            return self.loss_fn()

    def train_step(self) -> None:
        self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.runtime.sync()

    def sample(self) -> Tensor:
        with torch.no_grad(), self.runtime.autocast():
            out = self.sample_fn()
        self.runtime.sync()
        return out
