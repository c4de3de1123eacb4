"""The causal (decoder-only) transformer shared by the diffusion prior and the AR prior.

Pre-LayerNorm blocks (attention, then a GELU MLP), `F.scaled_dot_product_attention` with one
boolean mask that is causal and hides padded keys, and an optional key/value cache so that the
AR prior samples one token per step without recomputing the prefix.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class KVCache:
    """Keys and values of the tokens seen so far, one entry per layer, for incremental decoding.

    `keep` is the `[batch, tokens]` key-validity mask of everything cached so far.
    """

    def __init__(self, depth: int) -> None:
        self.keys: list[Optional[Tensor]] = [None] * depth
        self.values: list[Optional[Tensor]] = [None] * depth
        self.keep: Optional[Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.keep is None else self.keep.shape[1]


def attention_mask(keep: Tensor, num_queries: int) -> Tensor:
    """Boolean mask `[batch, 1, queries, keys]` (True = may attend) for the last `num_queries`
    positions of a sequence whose key validity is `keep` `[batch, keys]`.

    Query i attends to keys at or before its own position that are not padding, and always
    to itself: a padded query would otherwise have no key at all, and a fully masked row
    makes softmax return NaN. Padded positions' outputs are meaningless but finite, and no
    valid position ever attends to them.
    """
    batch, num_keys = keep.shape
    q_pos = torch.arange(num_keys - num_queries, num_keys, device=keep.device)[:, None]
    k_pos = torch.arange(num_keys, device=keep.device)[None, :]
    causal = k_pos <= q_pos
    allowed = causal[None] & (keep[:, None, :] | (k_pos == q_pos)[None])
    return rearrange(allowed, "b q k -> b 1 q k")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0, qkv_bias: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)

    def forward(
        self, x: Tensor, mask: Tensor, cache: Optional[KVCache] = None, layer: int = 0, queries: Optional[int] = None
    ) -> Tensor:
        """`x` `[batch, tokens, dim]`; `mask` from `attention_mask`; with a cache, `x` holds only
        the new tokens and their keys/values are appended to layer `layer`'s entry. With
        `queries` = n, only the last n positions query (keys and values still come from every
        token) and the result is `[batch, n, dim]`; `mask` then covers those n queries."""
        if queries is None:
            q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        else:
            # the same projection, split: queries for the last n tokens, keys/values for all
            sizes = [self.to_qkv.out_features // 3, 2 * self.to_qkv.out_features // 3]
            w_q, w_kv = self.to_qkv.weight.split(sizes)
            b_q, b_kv = self.to_qkv.bias.split(sizes) if self.to_qkv.bias is not None else (None, None)
            q = rearrange(F.linear(x[:, -queries:], w_q, b_q), "b n (h d) -> b h n d", h=self.heads)
            k, v = rearrange(F.linear(x, w_kv, b_kv), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        if cache is not None:
            if cache.keys[layer] is not None:
                k = torch.cat([cache.keys[layer], k], dim=2)
                v = torch.cat([cache.values[layer], v], dim=2)
            cache.keys[layer], cache.values[layer] = k, v
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * mult, dim)
        )


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int, dropout: float, qkv_bias: bool = False) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, dropout, qkv_bias)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult, dropout)

    def forward(
        self, x: Tensor, mask: Tensor, cache: Optional[KVCache] = None, layer: int = 0, queries: Optional[int] = None
    ) -> Tensor:
        """`[batch, tokens, dim]`, or with `queries` = n only the last n positions `[batch, n, dim]`."""
        attended = self.attn(self.norm_attn(x), mask, cache, layer, queries)
        x = (x if queries is None else x[:, -queries:]) + attended
        return x + self.ff(self.norm_ff(x))


class CausalTransformer(nn.Module):
    """`depth` pre-LN blocks and a final LayerNorm over `[batch, tokens, dim]`."""

    def __init__(
        self, dim: int, depth: int, heads: int, dim_head: int, ff_mult: int = 4, dropout: float = 0.0, qkv_bias: bool = False
    ) -> None:
        super().__init__()
        self.depth = depth
        self.blocks = nn.ModuleList(Block(dim, heads, dim_head, ff_mult, dropout, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(
        self, x: Tensor, keep: Optional[Tensor] = None, cache: Optional[KVCache] = None, last: Optional[int] = None
    ) -> Tensor:
        """`x`: `[batch, tokens, dim]`; `keep`: `[batch, tokens]` bool, False at padding (None:
        all valid). With `cache`, `x` and `keep` are only the tokens after the cached ones;
        the cache is extended in place. Returns `[batch, tokens, dim]`, or with `last` = n only
        the outputs of the last n positions `[batch, n, dim]`: the final block then computes
        only those (its queries, output projection and MLP; every token's keys and values),
        the same values for a fraction of that block's work (no cache)."""
        batch, tokens, _ = x.shape
        if keep is None:
            keep = torch.ones(batch, tokens, dtype=torch.bool, device=x.device)
        if keep.shape != (batch, tokens):
            raise ValueError(f"CausalTransformer: keep must be [{batch}, {tokens}], got {tuple(keep.shape)}")
        if cache is not None:
            keep = keep if cache.keep is None else torch.cat([cache.keep, keep], dim=1)
            cache.keep = keep
        if last is not None and (cache is not None or not 1 <= last <= tokens):
            raise ValueError(f"CausalTransformer: last must be in [1, {tokens}] and used without a cache, got {last}")
        mask = attention_mask(keep, tokens)
        for layer, block in enumerate(self.blocks):
            final = last is not None and layer == self.depth - 1
            x = block(x, mask[:, :, -last:] if final else mask, cache, layer, last if final else None)
        return self.norm(x)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-style initialisation: normal(0, std) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
