"""ADM/GLIDE-style UNet shared by the decoder and the upsamplers.

Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs", ADM) as extended by GLIDE (Nichol et al.
2021): residual blocks with GroupNorm and scale-shift conditioning from the timestep embedding,
BigGAN-style residual up/down-sampling, multi-head self-attention at chosen feature-map sizes,
and GLIDE's text conditioning, where each attention layer also attends to context tokens (their
keys and values concatenated to the pixels' keys and values). Output convolutions of every
residual branch and of the network are zero-initialised, so a fresh UNet predicts 0.

Activations run channels-last on CPU (oneDNN convolutions are fastest there), which also makes
the `[batch, channels, h, w] -> [batch, h*w, channels]` view taken by attention free. That and
the other CPU-tuned kernels (the folded upsampling conv, PointwiseConv's matmul) run only on
the devices in `TUNED_DEVICES`, where they were measured faster (benchmarks/RESULTS.md); other
devices run PyTorch's plain NCHW kernels, the same maths (`benchmarks/gpu_check.sh` times both
on a GPU).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.config import NonNegativeInt, PositiveInt, Probability, config_dataclass
from models.layers import timestep_embedding

# device types on which the CPU-tuned kernels run (measured faster there, and only there)
TUNED_DEVICES = frozenset({"cpu"})


def _tuned(x: Tensor) -> bool:
    return x.device.type in TUNED_DEVICES


@config_dataclass
class UNetConfig:
    base_channels: PositiveInt = 128
    channel_mults: tuple[PositiveInt, ...] = (1, 2, 3, 4)
    num_res_blocks: PositiveInt = 2
    # Side lengths (pixels) of the feature maps that get attention, measured when the UNet
    # runs at its reference `image_size`; empty: no attention anywhere (the paper's upsamplers).
    attention_resolutions: tuple[PositiveInt, ...] = (32, 16, 8)
    head_channels: PositiveInt = 64
    dropout: Probability = 0.0
    norm_groups: PositiveInt = 32
    gradient_checkpointing: bool = False
    # Attention layers (self-attention plus the context tokens) after each residual block at an
    # attention resolution; ADM/GLIDE use 1.
    num_context_layers_per_block: NonNegativeInt = 1
    # ADM's use_scale_shift_norm: the embedding scales and shifts the second GroupNorm's
    # output; false: it is added before that norm (DDPM's way; Karlo's super-resolution UNets).
    scale_shift_norm: bool = True

    def __post_init__(self) -> None:
        if not self.channel_mults:
            raise ValueError("unet.channel_mults must name at least one level, got ()")


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _norm(groups: int, channels: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"unet.norm_groups ({groups}) must divide every level's channel count (got {channels})")
    return nn.GroupNorm(groups, channels)


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution computed as a matmul over the channel axis: on channels-last CPU
    tensors PyTorch runs 1x1 convs on its slow im2col path, a matmul on oneDNN/BLAS."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if not _tuned(x):
            return super().forward(x)
        weight = self.weight.view(self.out_channels, self.in_channels)
        out = F.linear(x.permute(0, 2, 3, 1), weight, self.bias)
        return out.permute(0, 3, 1, 2)


def _fold_taps(w: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Along kernel axis `dim` (3 taps), the 2-tap kernels that nearest-2x upsampling followed
    by the 3-tap kernel amounts to, for even and odd output positions: taps (w0, w1 + w2) over
    low-res positions (i - 1, i) and (w0 + w1, w2) over (i, i + 1)."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def upsample_conv3x3(h: Tensor, conv: nn.Conv2d) -> Tensor:
    """`conv(nearest_upsample_2x(h))` for a 3x3, padding-1 `conv`, computed exactly on the
    low-res grid as four 2x2 convolutions, one per output phase, interleaved: 16 instead of 36
    multiply-adds per low-res pixel and channel pair, and no upsampled input in memory.
    `h`: `[batch, in, h, w]` -> `[batch, out, 2h, 2w]` (channels-last). Off `TUNED_DEVICES`,
    the upsampling and the 3x3 conv as they are."""
    if not _tuned(h):
        return conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
    height, width = h.shape[-2:]
    padded = F.pad(h, (1, 1, 1, 1))
    rows = _fold_taps(conv.weight, 2)
    phases = []
    for a, row_kernel in enumerate(rows):
        cols = _fold_taps(row_kernel, 3)
        # phase (a, b) reads padded rows a .. a + h and columns b .. b + w
        phases.append(
            [
                F.conv2d(padded[:, :, a : a + height + 1, b : b + width + 1], kernel, conv.bias)
                for b, kernel in enumerate(cols)
            ]
        )
    # out[n, c, 2i + a, 2j + b] = phases[a][b][n, c, i, j], assembled channels-last in one copy
    grid = torch.stack(
        [torch.stack([p.permute(0, 2, 3, 1) for p in row], dim=3) for row in phases], dim=2
    )  # [n, h, a, w, b, c]
    return rearrange(grid, "n h a w b c -> n (h a) (w b) c").permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the second norm modulated by `emb` (scale-shift, or `emb`
    added before it); optional 2x resampling of both branches before the first conv
    (BigGAN/ADM `resblock_updown`)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        groups: int,
        dropout: float,
        resample: Optional[Literal["up", "down"]] = None,
        scale_shift: bool = True,
    ) -> None:
        super().__init__()
        self.resample = resample
        self.scale_shift = scale_shift
        self.norm_in = _norm(groups, in_channels)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, (2 if scale_shift else 1) * out_channels)
        self.norm_out = _norm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else PointwiseConv(in_channels, out_channels)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """`x`: `[batch, in, h, w]`; `emb`: `[batch, emb_dim]`, already through SiLU."""
        h = F.silu(self.norm_in(x))
        h = upsample_conv3x3(h, self.conv_in) if self.resample == "up" else self.conv_in(self._resample(h))
        x = self._resample(x)
        if self.scale_shift:
            scale, shift = rearrange(self.emb_proj(emb), "b (two c) -> two b c 1 1", two=2)
            h = torch.addcmul(shift, self.norm_out(h), 1 + scale)
        else:
            h = self.norm_out(h + rearrange(self.emb_proj(emb), "b c -> b c 1 1"))
        h = self.conv_out(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over pixels; with context, GLIDE-style: the context tokens'
    keys and values join the pixels' in the same softmax (padding tokens masked out)."""

    def __init__(self, channels: int, head_channels: int, groups: int, context_dim: Optional[int]) -> None:
        super().__init__()
        if channels % head_channels:
            raise ValueError(
                f"unet.head_channels ({head_channels}) must divide the channel count ({channels}) "
                "of every level that has attention"
            )
        self.heads = channels // head_channels
        self.norm = _norm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.context_kv = nn.Linear(context_dim, 2 * channels) if context_dim else None
        self.proj_out = _zero(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Optional[Tensor] = None, context_mask: Optional[Tensor] = None) -> Tensor:
        """`x`: `[batch, c, h, w]`; `context`: `[batch, tokens, context_dim]`; `context_mask`:
        `[batch, tokens]` bool, True where a token is real."""
        height = x.shape[2]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        q, k, v = rearrange(self.qkv(tokens), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        mask = None
        if context is not None and self.context_kv is not None:
            ck, cv = rearrange(self.context_kv(context), "b m (two h d) -> two b h m d", two=2, h=self.heads)
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
            if context_mask is not None:
                pixels = context_mask.new_ones(x.shape[0], tokens.shape[1])
                mask = rearrange(torch.cat([context_mask, pixels], dim=1), "b n -> b 1 1 n")
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.proj_out(rearrange(out, "b h n d -> b n (h d)"))
        return x + rearrange(out, "b (h w) c -> b c h w", h=height)


class UNetBlock(nn.Module):
    """One residual block followed by zero or more attention layers."""

    def __init__(self, res: ResBlock, attention: list[AttentionBlock]) -> None:
        super().__init__()
        self.res = res
        self.attention = nn.ModuleList(attention)

    def forward(self, h: Tensor, emb: Tensor, context: Optional[Tensor], context_mask: Optional[Tensor]) -> Tensor:
        h = self.res(h, emb)
        for attn in self.attention:
            h = attn(h, context, context_mask)
        return h


class UNet(nn.Module):
    """Noise-prediction UNet `[batch, in_channels, H, W] -> [batch, out_channels, H, W]`.

    Conditioning hooks: the timestep `t`; `cond` `[batch, cond_dim]` projected and added to the
    timestep embedding (`cond_emb` `[batch, 4 * base_channels]`: added as it is); `context` tokens `[batch, n, context_dim]` attended to by every
    attention layer; `extra` channels (e.g. an upsampled low-res image) concatenated to `x`.
    `image_size` is the side length at which `cfg.attention_resolutions` are measured; the
    network itself runs at any size divisible by `2 ** (len(channel_mults) - 1)`.
    """

    def __init__(
        self,
        cfg: UNetConfig,
        in_channels: int,
        out_channels: int,
        *,
        cond_dim: Optional[int] = None,
        context_dim: Optional[int] = None,
        extra_in_channels: int = 0,
        image_size: int = 64,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_channels, self.out_channels = in_channels, out_channels
        self.cond_dim, self.context_dim, self.extra_in_channels = cond_dim, context_dim, extra_in_channels
        self.downsample_factor = 2 ** (len(cfg.channel_mults) - 1)
        sizes = [image_size // 2**level for level in range(len(cfg.channel_mults))]
        unknown = sorted(set(cfg.attention_resolutions) - set(sizes))
        if image_size % self.downsample_factor or unknown:
            raise ValueError(
                f"unet.attention_resolutions {list(cfg.attention_resolutions)}: {unknown} are not feature-map "
                f"sizes of this UNet, which at image_size {image_size} has {sizes}"
            )
        base = cfg.base_channels
        emb_dim = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_proj = nn.Linear(cond_dim, emb_dim) if cond_dim else None
        self.conv_in = nn.Conv2d(in_channels + extra_in_channels, base, 3, padding=1)

        def res(cin: int, cout: int, resample: Optional[Literal["up", "down"]] = None) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, cfg.norm_groups, cfg.dropout, resample, cfg.scale_shift_norm)

        def block(cin: int, cout: int, resolution: int) -> UNetBlock:
            n_attn = cfg.num_context_layers_per_block if resolution in cfg.attention_resolutions else 0
            attn = [AttentionBlock(cout, cfg.head_channels, cfg.norm_groups, context_dim) for _ in range(n_attn)]
            return UNetBlock(res(cin, cout), attn)

        self.down = nn.ModuleList()
        skip_channels, ch, resolution = [base], base, image_size
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(ch, mult * base, resolution))
                ch = mult * base
                skip_channels.append(ch)
            if level < len(cfg.channel_mults) - 1:
                self.down.append(UNetBlock(res(ch, ch, "down"), []))
                skip_channels.append(ch)
                resolution //= 2
        self.middle = nn.ModuleList([block(ch, ch, resolution), UNetBlock(res(ch, ch), [])])
        self.up = nn.ModuleList()
        self.up_resample = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(block(ch + skip_channels.pop(), mult * base, resolution))
                ch = mult * base
            if level > 0:
                # keyed by the index of the up block it follows
                self.up_resample[str(len(self.up) - 1)] = UNetBlock(res(ch, ch, "up"), [])
                resolution *= 2
        self.norm_out = _norm(cfg.norm_groups, ch)
        self.conv_out = _zero(nn.Conv2d(ch, out_channels, 3, padding=1))

    def _run(self, block: UNetBlock, h: Tensor, emb: Tensor, context, context_mask) -> Tensor:
        if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, context_mask, use_reentrant=False)
        return block(h, emb, context, context_mask)

    def _check_inputs(self, x, t, cond, context, context_mask, extra) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet: x must be [batch, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[2] % self.downsample_factor or x.shape[3] % self.downsample_factor:
            raise ValueError(
                f"UNet: H and W ({x.shape[2]}x{x.shape[3]}) must be divisible by {self.downsample_factor} "
                "(2 ** (len(channel_mults) - 1))"
            )
        if t.shape != (x.shape[0],):
            raise ValueError(f"UNet: t must be [batch] = [{x.shape[0]}], got {tuple(t.shape)}")
        if (cond is None) != (self.cond_proj is None):
            raise ValueError(f"UNet: cond must be given iff cond_dim is set (cond_dim={self.cond_dim})")
        if context is not None and self.context_dim is None:
            raise ValueError("UNet: context given but the UNet was built without context_dim")
        if context_mask is not None and context is None:
            raise ValueError("UNet: context_mask given without context")
        if (extra is None) != (self.extra_in_channels == 0):
            raise ValueError(f"UNet: extra must be given iff extra_in_channels > 0 (it is {self.extra_in_channels})")
        if extra is not None and extra.shape != (x.shape[0], self.extra_in_channels, *x.shape[2:]):
            raise ValueError(
                f"UNet: extra must be [batch, {self.extra_in_channels}, {x.shape[2]}, {x.shape[3]}], "
                f"got {tuple(extra.shape)}"
            )

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        *,
        cond: Optional[Tensor] = None,
        context: Optional[Tensor] = None,
        context_mask: Optional[Tensor] = None,
        extra: Optional[Tensor] = None,
        cond_emb: Optional[Tensor] = None,
    ) -> Tensor:
        """`x`: `[batch, in_channels, H, W]`; `t`: `[batch]` timesteps; `cond`: `[batch, cond_dim]`;
        `cond_emb`: `[batch, 4 * base_channels]`, an already projected embedding to add;
        `context`: `[batch, n, context_dim]` with `context_mask` `[batch, n]` bool (True = real
        token; default all real); `extra`: `[batch, extra_in_channels, H, W]`.
        Returns `[batch, out_channels, H, W]`."""
        self._check_inputs(x, t, cond, context, context_mask, extra)
        if extra is not None:
            x = torch.cat([x, extra.to(x.dtype)], dim=1)
        if _tuned(x):
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = self.conv_in.weight.dtype
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels).to(dtype))
        if cond is not None:
            emb = emb + self.cond_proj(cond.to(dtype))
        if cond_emb is not None:
            emb = emb + cond_emb.to(dtype)
        emb = F.silu(emb)  # every ResBlock's projection starts with SiLU; do it once
        if context is not None:
            context = context.to(dtype)
            if context_mask is not None:
                context_mask = context_mask.to(device=x.device, dtype=torch.bool)

        h = self.conv_in(x.to(dtype))
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb, context, context_mask)
            skips.append(h)
        for block in self.middle:
            h = self._run(block, h, emb, context, context_mask)
        for i, block in enumerate(self.up):
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
            if str(i) in self.up_resample:
                h = self._run(self.up_resample[str(i)], h, emb, context, context_mask)
        return self.conv_out(F.silu(self.norm_out(h)))
