"""PCA of CLIP image embeddings and a per-component scalar quantiser (the AR prior's tokens).

unCLIP (Sec. 2.2) keeps the 319 of 1024 principal components that hold nearly all the
variance, orders them by decreasing eigenvalue and quantises each into 1024 buckets.

Buckets are equal-mass (quantile) buckets rather than uniform over each component's range:
components are roughly Gaussian with outliers, so uniform buckets spend most of the 1024
codes on a few tail values while the bulk shares a handful; quantile buckets make every code
equally frequent (the most information per token for the transformer) and keep the
reconstruction error small where the data are. A bucket decodes to its median.

Everything the fit produces is a buffer of a size fixed at construction (`max_components`
rows), with the fitted count in `num_components`, so `state_dict`/`load_state_dict` carry a
fit between models of the same config.
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.layers import FullPrecisionBuffers


def column_quantiles(x: Tensor, q: Tensor) -> Tensor:
    """Quantiles `q` `[Q]` of each column of `x` `[N, C]` (linear interpolation) -> `[Q, C]`.

    Sorting instead of `torch.quantile`, which refuses inputs above 16M elements; rows of the
    transpose, because sorting contiguous rows is about twice as fast as strided columns.
    """
    n = x.shape[0]
    sorted_rows = x.T.contiguous().sort(dim=1).values  # [C, N]
    pos = q.to(device=x.device, dtype=torch.float64) * (n - 1)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo.to(torch.float64)).to(x.dtype)
    return (sorted_rows[:, lo] * (1 - frac) + sorted_rows[:, hi] * frac).T


_CHUNK = 65536  # rows per matmul when fitting: float64 copies of millions of embeddings add up


def _mean_and_covariance(x: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """Float64 mean `[D]` and sample covariance `[D, D]` of `x` `[N, D]`, a chunk at a time."""
    n = x.shape[0]
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
    for chunk in x.split(_CHUNK):
        total += chunk.to(device=device, dtype=torch.float64).sum(dim=0)
    mean = total / n
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=device)
    for chunk in x.split(_CHUNK):
        centered = chunk.to(device=device, dtype=torch.float64) - mean
        cov += centered.T @ centered
    return mean, cov / (n - 1)


class PCAQuantizer(FullPrecisionBuffers):
    """PCA to the fewest components holding `variance` of the variance, then quantile buckets.

    `dim`: the embedding size D; `max_components`: the most components kept (and the buffer
    size); `num_buckets`: codes per component.
    """

    def __init__(self, dim: int, max_components: int, num_buckets: int, variance: float = 0.99) -> None:
        super().__init__()
        if not 1 <= max_components <= dim:
            raise ValueError(f"max_components must be in [1, {dim}] (the embedding size), got {max_components}")
        if num_buckets < 2:
            raise ValueError(f"num_buckets must be >= 2, got {num_buckets}")
        self.dim, self.max_components, self.num_buckets = dim, max_components, num_buckets
        self.variance = variance
        self.register_buffer("num_components", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("components", torch.zeros(max_components, dim))  # rows: unit eigenvectors
        self.register_buffer("explained_variance", torch.zeros(max_components))
        self.register_buffer("edges", torch.zeros(max_components, num_buckets - 1))  # interior boundaries
        self.register_buffer("centers", torch.zeros(max_components, num_buckets))  # decoded values

    @property
    def k(self) -> int:
        """The number of components kept by the fit (0 before `fit`)."""
        return int(self.num_components)

    @property
    def fitted(self) -> bool:
        return self.k > 0

    @torch.no_grad()
    def fit(self, x: Tensor) -> int:
        """Fit on `x` `[N, D]` (N >= 2); returns the number of components kept."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"PCAQuantizer.fit: expected [N, {self.dim}], got {tuple(x.shape)}")
        if x.shape[0] < 2:
            raise ValueError(f"PCAQuantizer.fit: need at least 2 embeddings, got {x.shape[0]}")
        mean, cov = _mean_and_covariance(x.detach(), self.mean.device)
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        eigvals, eigvecs = eigvals.flip(0).clamp(min=0), eigvecs.flip(1)
        share = eigvals.cumsum(0) / eigvals.sum().clamp(min=1e-30)
        # fewest components whose cumulative share reaches the target (tolerance for rounding)
        k = int((share < self.variance - 1e-9).sum().item()) + 1
        k = min(k, self.max_components)
        components = eigvecs[:, :k].T  # [k, D]
        # [N, k] in float32, which halves the memory of the sort in the quantiles
        coeffs = torch.cat([
            ((chunk.to(device=mean.device, dtype=torch.float64) - mean) @ components.T).float()
            for chunk in x.detach().split(_CHUNK)
        ])
        nb = self.num_buckets
        edges = column_quantiles(coeffs, torch.arange(1, nb, dtype=torch.float64) / nb).T
        centers = column_quantiles(coeffs, (torch.arange(nb, dtype=torch.float64) + 0.5) / nb).T
        self.mean.copy_(mean)
        self.components.zero_()
        self.components[:k].copy_(components)
        self.explained_variance.zero_()
        self.explained_variance[:k].copy_(eigvals[:k])
        self.edges.zero_()
        self.edges[:k].copy_(edges)
        self.centers.zero_()
        self.centers[:k].copy_(centers)
        self.num_components.fill_(k)
        return k

    def _require_fit(self, what: str) -> None:
        if not self.fitted:
            raise RuntimeError(f"PCAQuantizer.{what}: not fitted; call fit(image_embeds) first")

    def project(self, x: Tensor) -> Tensor:
        """PCA coefficients `[N, k]` of embeddings `[N, D]`."""
        self._require_fit("project")
        return (x.to(self.mean.dtype) - self.mean) @ self.components[: self.k].T

    def unproject(self, coeffs: Tensor) -> Tensor:
        """Embeddings `[N, D]` from coefficients `[N, k]` (not renormalised)."""
        self._require_fit("unproject")
        return coeffs.to(self.mean.dtype) @ self.components[: self.k] + self.mean

    def quantize(self, x: Tensor) -> Tensor:
        """Embeddings `[N, D]` -> codes LongTensor `[N, k]` in `[0, num_buckets)`."""
        coeffs = self.project(x)
        codes = torch.searchsorted(self.edges[: self.k].contiguous(), coeffs.T.contiguous())
        return codes.T.contiguous()

    def dequantize(self, codes: Tensor) -> Tensor:
        """Codes `[N, k]` -> embeddings `[N, D]` (bucket medians, then inverse PCA)."""
        self._require_fit("dequantize")
        if codes.ndim != 2 or codes.shape[1] != self.k:
            raise ValueError(f"PCAQuantizer.dequantize: expected codes [N, {self.k}], got {tuple(codes.shape)}")
        centers = self.centers[: self.k]  # [k, nb]
        coeffs = centers.gather(1, codes.T.long()).T  # [N, k]
        return self.unproject(coeffs)


class ScalarQuantizer(FullPrecisionBuffers):
    """Equal-mass buckets of one scalar (the AR prior's image-text dot product token).

    Before `fit` the buckets are uniform over `[low, high]`. With equal-mass buckets a code's
    index is its quantile in the training distribution (code i ~ quantile i / num_buckets),
    which is what sampling "from the top half of the distribution" needs.
    """

    def __init__(self, num_buckets: int, low: float = -1.0, high: float = 1.0) -> None:
        super().__init__()
        if num_buckets < 2:
            raise ValueError(f"num_buckets must be >= 2, got {num_buckets}")
        self.num_buckets = num_buckets
        self.register_buffer("edges", torch.linspace(low, high, num_buckets + 1)[1:-1].clone())

    @torch.no_grad()
    def fit(self, values: Tensor) -> None:
        """Fit the boundaries to the quantiles of `values` `[N]`."""
        v = values.detach().flatten().to(device=self.edges.device, dtype=torch.float64)
        if v.numel() < 2:
            raise ValueError(f"ScalarQuantizer.fit: need at least 2 values, got {v.numel()}")
        q = torch.arange(1, self.num_buckets, dtype=torch.float64) / self.num_buckets
        self.edges.copy_(column_quantiles(v[:, None], q)[:, 0])

    def forward(self, values: Tensor) -> Tensor:
        """Values `[N]` -> codes LongTensor `[N]` in `[0, num_buckets)`."""
        return torch.searchsorted(self.edges, values.to(self.edges.dtype).contiguous())
