"""The UNet: shapes under every conditioning hook, zero init, masking, checkpointing."""

from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from models.unet import UNet, UNetConfig, upsample_conv3x3


TINY = UNetConfig(
    base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(8,), head_channels=8, norm_groups=4
)


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Zero-initialised output convs make a fresh UNet return 0; give every weight a value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _inputs(batch=2, size=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, 1000, (batch,), generator=gen)


def test_fresh_unet_predicts_zero():
    x, t = _inputs()
    out = UNet(TINY, 3, 5, image_size=16)(x, t)
    assert out.shape == (2, 5, 16, 16)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("with_cond", [False, True])
@pytest.mark.parametrize("with_context", [False, True])
@pytest.mark.parametrize("extra_channels", [0, 3])
def test_shapes_under_every_conditioning(with_cond, with_context, extra_channels):
    model = _randomise(
        UNet(
            TINY,
            3,
            3,
            cond_dim=6 if with_cond else None,
            context_dim=10 if with_context else None,
            extra_in_channels=extra_channels,
            image_size=16,
        )
    )
    x, t = _inputs()
    kwargs = {}
    if with_cond:
        kwargs["cond"] = torch.randn(2, 6)
    if with_context:
        kwargs["context"] = torch.randn(2, 7, 10)
        kwargs["context_mask"] = torch.tensor([[True] * 3 + [False] * 4, [True] * 7])
    if extra_channels:
        kwargs["extra"] = torch.randn(2, extra_channels, 16, 16)
    out = model(x, t, **kwargs)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
    assert out.abs().sum() > 0
    # fully convolutional: a larger image (divisible by 2) runs too
    big = {k: (torch.randn(2, extra_channels, 32, 32) if k == "extra" else v) for k, v in kwargs.items()}
    assert model(torch.randn(2, 3, 32, 32), t, **big).shape == (2, 3, 32, 32)


def test_every_hook_changes_the_output():
    model = _randomise(UNet(TINY, 3, 3, cond_dim=6, context_dim=10, extra_in_channels=3, image_size=16)).eval()
    x, t = _inputs()
    base = dict(cond=torch.randn(2, 6), context=torch.randn(2, 4, 10), extra=torch.randn(2, 3, 16, 16))
    ref = model(x, t, **base)
    assert not torch.allclose(ref, model(x, t + 1, **base))
    for key in base:
        changed = {**base, key: base[key] + 1.0}
        assert not torch.allclose(ref, model(x, t, **changed)), key


def test_masked_context_tokens_are_ignored():
    model = _randomise(UNet(TINY, 3, 3, context_dim=10, image_size=16)).eval()
    x, t = _inputs()
    context = torch.randn(2, 5, 10)
    mask = torch.tensor([[True, True, False, False, False]] * 2)
    ref = model(x, t, context=context, context_mask=mask)
    garbage = context.clone()
    garbage[:, 2:] = 1e3 * torch.randn(2, 3, 10)
    torch.testing.assert_close(model(x, t, context=garbage, context_mask=mask), ref)
    # and the same as giving only the real tokens
    torch.testing.assert_close(model(x, t, context=context[:, :2]), ref, atol=1e-5, rtol=1e-5)


def test_rows_are_independent():
    model = _randomise(UNet(TINY, 3, 3, cond_dim=6, context_dim=10, image_size=16)).eval()
    x, t = _inputs(batch=3)
    cond, context = torch.randn(3, 6), torch.randn(3, 4, 10)
    full = model(x, t, cond=cond, context=context)
    single = model(x[1:2], t[1:2], cond=cond[1:2], context=context[1:2])
    torch.testing.assert_close(full[1:2], single, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = UNetConfig(**{**TINY.__dict__, "dropout": 0.1})
    ckpt_cfg = UNetConfig(**{**cfg.__dict__, "gradient_checkpointing": True})
    plain = _randomise(UNet(cfg, 3, 3, cond_dim=6, context_dim=10, image_size=16)).train()
    ckpt = UNet(ckpt_cfg, 3, 3, cond_dim=6, context_dim=10, image_size=16).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t = _inputs()
    cond, context = torch.randn(2, 6), torch.randn(2, 4, 10)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(3)  # same dropout masks
        model.zero_grad()
        model(x, t, cond=cond, context=context).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_attention_placement_follows_resolutions():
    def n_attn(cfg, size):
        return sum(1 for m in UNet(cfg, 3, 3, image_size=size).modules() if m.__class__.__name__ == "AttentionBlock")

    assert n_attn(UNetConfig(**{**TINY.__dict__, "attention_resolutions": ()}), 16) == 0
    # at 16px with one downsampling, resolution 8 is the second level and the middle:
    # 1 down block + 1 middle + 2 up blocks
    assert n_attn(TINY, 16) == 4
    assert n_attn(UNetConfig(**{**TINY.__dict__, "num_context_layers_per_block": 2}), 16) == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(x=torch.randn(2, 4, 16, 16)), "x must be"),
        (dict(x=torch.randn(2, 3, 15, 16)), "divisible"),
        (dict(t=torch.zeros(3, dtype=torch.long)), "t must be"),
        (dict(context=torch.randn(2, 3, 10)), "context_dim"),
    ],
)
def test_bad_inputs_name_the_problem(kwargs, message):
    model = UNet(TINY, 3, 3, image_size=16)
    x, t = _inputs()
    args = {"x": x, "t": t, **kwargs}
    with pytest.raises(ValueError, match=message):
        model(args.pop("x"), args.pop("t"), **args)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="norm_groups"):
        UNet(UNetConfig(**{**TINY.__dict__, "norm_groups": 5}), 3, 3, image_size=16)
    with pytest.raises(ValueError, match=r"attention_resolutions \[8, 3\]: \[3\] are not feature-map sizes"):
        UNet(UNetConfig(**{**TINY.__dict__, "attention_resolutions": (8, 3)}), 3, 3, image_size=16)
    with pytest.raises(ValueError, match="head_channels"):
        UNet(UNetConfig(**{**TINY.__dict__, "head_channels": 7}), 3, 3, image_size=16)


@pytest.mark.parametrize("channels_in, channels_out, height, width", [(8, 8, 4, 6), (5, 3, 1, 1), (16, 24, 7, 3)])
def test_subpixel_upsample_conv_equals_nearest_then_conv(channels_in, channels_out, height, width):
    conv = torch.nn.Conv2d(channels_in, channels_out, 3, padding=1).double()
    h = torch.randn(2, channels_in, height, width, dtype=torch.float64, requires_grad=True)
    ref = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
    out = upsample_conv3x3(h, conv)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().sum(), (h, conv.weight, conv.bias))
    ref_grads = torch.autograd.grad(ref.square().sum(), (h, conv.weight, conv.bias))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
