"""The diffusion prior, its causal transformer and the shared timestep embedding."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from models.config import build_config
from models.diffusion import DiffusionConfig
from models.layers import timestep_embedding
from models.prior import DiffusionPrior, DiffusionPriorConfig, select_candidates
from models.transformer import CausalTransformer, KVCache

D, W, L = 16, 12, 8
ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(**overrides) -> DiffusionPriorConfig:
    base = dict(
        embed_dim=D, text_width=W, max_text_len=L, dim=32, depth=2, heads=2, dim_head=16,
        diffusion=DiffusionConfig(timesteps=100, objective="x0", sample_steps=8),
    )
    base.update(overrides)
    return DiffusionPriorConfig(**base)


def batch(b=4, length=5, valid=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, D, generator=g), dim=-1)
    text = F.normalize(torch.randn(b, D, generator=g), dim=-1)
    enc = torch.randn(b, length, W, generator=g)
    mask = torch.arange(length)[None].expand(b, length) < valid
    return image, text, enc, mask


def model(**overrides) -> DiffusionPrior:
    torch.manual_seed(0)
    return DiffusionPrior(tiny_cfg(**overrides)).eval()


# ------------------------------------------------------------------ timestep embedding
def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 1]), 4)
    assert emb.dtype == torch.float32 and emb.shape == (2, 4)
    # frequencies 1 and 1/100 (= 10000 ** -(1/2)): [cos t, cos t/100, sin t, sin t/100]
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0], [math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)]])
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(torch.tensor([3]), 7)[0, -1] == 0  # odd width: zero pad column


# ------------------------------------------------------------------ causal transformer
def test_transformer_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    net = CausalTransformer(dim=16, depth=2, heads=2, dim_head=8).eval()
    x = torch.randn(2, 6, 16)
    base = net(x)
    later = x.clone()
    later[:, 3] = torch.randn(2, 16)  # (a constant shift would vanish in the LayerNorms)
    out = net(later)
    torch.testing.assert_close(out[:, :3], base[:, :3])
    assert (out[:, 3:] - base[:, 3:]).abs().amax() > 1e-3

    keep = torch.tensor([[True, False, True, True, True, True]] * 2)
    padded = x.clone()
    padded[:, 1] = 100.0  # a padded key must change nothing at the valid positions
    a, b = net(x, keep), net(padded, keep)
    torch.testing.assert_close(a[:, [0, 2, 3, 4, 5]], b[:, [0, 2, 3, 4, 5]])


def test_fully_padded_row_stays_finite():
    net = CausalTransformer(dim=16, depth=1, heads=2, dim_head=8)
    keep = torch.tensor([[False, False, True]])  # position 0 has no valid key but itself
    assert torch.isfinite(net(torch.randn(1, 3, 16), keep)).all()


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    net = CausalTransformer(dim=16, depth=2, heads=2, dim_head=8).eval()
    x = torch.randn(2, 7, 16)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 1] = False
    full = net(x, keep)
    cache = KVCache(2)
    parts = [net(x[:, :4], keep[:, :4], cache)] + [net(x[:, i : i + 1], keep[:, i : i + 1], cache) for i in range(4, 7)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_last_outputs_match_the_full_forward_values_and_gradients():
    # `last=n` runs the final block for the last n positions only (a speed path): same values,
    # and the same gradients for every weight, as slicing the full output
    torch.manual_seed(0)
    net = CausalTransformer(dim=16, depth=2, heads=2, dim_head=8)
    x = torch.randn(2, 7, 16)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 1:3] = False
    for n in (1, 3, 7):
        full = net(x, keep)[:, -n:]
        full.square().sum().backward()
        grads = {k: p.grad.clone() for k, p in net.named_parameters()}
        net.zero_grad()
        part = net(x, keep, last=n)
        part.square().sum().backward()
        torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)
        for k, p in net.named_parameters():
            torch.testing.assert_close(p.grad, grads[k], atol=1e-5, rtol=1e-5, msg=k)
        net.zero_grad()
    with pytest.raises(ValueError, match="last"):
        net(x, keep, last=8)


def test_prior_output_is_the_query_position_of_the_sequence():
    m = model()
    image, text, enc, mask = batch()
    t = torch.tensor([0, 10, 50, 99])
    kwargs = dict(text_embed=text, text_encodings=enc, text_mask=mask, null_cond=torch.zeros(4, dtype=torch.bool))
    seq = m(image, t, return_sequence=True, **kwargs)
    torch.testing.assert_close(m(image, t, **kwargs), m.to_out(seq[:, -1]), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ diffusion prior: forward
def test_forward_shapes_and_sequence_layout():
    m = model()
    image, text, enc, mask = batch()
    t = torch.tensor([0, 10, 50, 99])
    assert m(image, t, text_embed=text, text_encodings=enc, text_mask=mask).shape == (4, D)
    seq = m(image, t, text_embed=text, text_encodings=enc, text_mask=mask, return_sequence=True)
    assert seq.shape == (4, 5 + 4, 32)


def test_diffusion_prior_is_causal():
    m = model()
    image, text, enc, mask = batch()
    t = torch.full((4,), 10)
    kw = dict(text_embed=text, text_encodings=enc, text_mask=mask, return_sequence=True)
    base = m(image, t, **kw)
    # the noised image embedding is token L+2 (after text, text embed, time): only it and the
    # query may see a change in it
    other = m(image + 0.5, t, **kw)
    torch.testing.assert_close(other[:, :7], base[:, :7])
    assert (other[:, 7:] - base[:, 7:]).abs().amax() > 1e-4
    later_t = m(image, t + 50, **kw)  # the timestep token is position L+1
    torch.testing.assert_close(later_t[:, :6], base[:, :6])
    assert (later_t[:, 6:] - base[:, 6:]).abs().amax() > 1e-4


def test_padding_does_not_change_the_output():
    m = model()
    image, text, enc, mask = batch(length=3, valid=3)
    t = torch.tensor([5, 20, 60, 90])
    ref = m(image, t, text_embed=text, text_encodings=enc, text_mask=mask)
    longer = torch.cat([enc, 50 * torch.randn(4, 5, W)], dim=1)  # garbage in padded slots
    longer_mask = torch.cat([mask, torch.zeros(4, 5, dtype=torch.bool)], dim=1)
    out = m(image, t, text_embed=text, text_encodings=longer, text_mask=longer_mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the unconditional prediction does not depend on the padded length either
    null = torch.ones(4, dtype=torch.bool)
    u1 = m(image, t, text_embed=text, text_encodings=enc, text_mask=mask, null_cond=null)
    u2 = m(image, t, text_embed=text, text_encodings=longer, text_mask=longer_mask, null_cond=null)
    torch.testing.assert_close(u1, u2, atol=1e-5, rtol=1e-5)


def test_without_text_encodings_the_sequence_has_four_tokens():
    m = model(use_text_encodings=False)
    image, text, _, _ = batch()
    seq = m(image, torch.zeros(4, dtype=torch.long), text_embed=text, return_sequence=True)
    assert seq.shape == (4, 4, 32)
    assert not any("text_proj" in name for name, _ in m.named_parameters())


def test_bad_inputs_name_the_argument():
    m = model()
    image, text, enc, mask = batch()
    t = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="text_embed"):
        m(image, t, text_embed=text[:, :5], text_encodings=enc, text_mask=mask)
    with pytest.raises(ValueError, match="text_encodings are required"):
        m(image, t, text_embed=text)
    with pytest.raises(ValueError, match="max_text_len"):
        m(image, t, text_embed=text, text_encodings=torch.randn(4, L + 1, W))
    with pytest.raises(ValueError, match="text_mask"):
        m(image, t, text_embed=text, text_encodings=enc, text_mask=mask.float())


# ------------------------------------------------------------------ classifier-free guidance
def test_training_forward_draws_the_dropout_and_null_cond_overrides():
    m = model(text_encodings_drop=1.0, text_embed_drop=1.0)
    image, text, enc, mask = batch()
    t = torch.tensor([1, 2, 3, 4])
    kw = dict(text_embed=text, text_encodings=enc, text_mask=mask)
    uncond = m(image, t, null_cond=torch.ones(4, dtype=torch.bool), **kw)
    cond = m(image, t, **kw)  # eval: nothing dropped
    assert (uncond - cond).abs().amax() > 1e-4
    m.train()  # dropout 0 in the config, so only the CFG drop differs between modes
    torch.testing.assert_close(m(image, t, **kw), uncond)
    # null_cond given: no random drop, even in training mode with drop probability 1
    torch.testing.assert_close(m(image, t, null_cond=torch.zeros(4, dtype=torch.bool), **kw), cond)
    mixed = m(image, t, null_cond=torch.tensor([True, False, True, False]), **kw)
    torch.testing.assert_close(mixed[[0, 2]], uncond[[0, 2]])
    torch.testing.assert_close(mixed[[1, 3]], cond[[1, 3]])
    only_embed = m(image, t, cond_drop={"text_encodings": torch.zeros(4, dtype=torch.bool),
                                        "text_embed": torch.ones(4, dtype=torch.bool)}, **kw)
    assert (only_embed - cond).abs().amax() > 1e-4 and (only_embed - uncond).abs().amax() > 1e-4


# ------------------------------------------------------------------ training
def test_loss_is_reproducible_with_a_generator():
    m = model()
    m.train()
    image, text, enc, mask = batch()
    a = m.loss(image, text, enc, mask, generator=torch.Generator().manual_seed(3))
    b = m.loss(image, text, enc, mask, generator=torch.Generator().manual_seed(3))
    assert a.item() == b.item() and a.ndim == 0


def test_overfits_a_fixed_batch():
    torch.manual_seed(0)
    m = DiffusionPrior(tiny_cfg(text_encodings_drop=0.0, text_embed_drop=0.0))
    image, text, enc, mask = batch(b=8, seed=1)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)

    def eval_loss():
        m.eval()
        with torch.no_grad():  # the same t and noise each time: 8 rows x 16 draws
            g = torch.Generator().manual_seed(123)
            loss = sum(m.loss(image, text, enc, mask, generator=g) for _ in range(16)) / 16
        m.train()
        return loss.item()

    start = eval_loss()
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        opt.zero_grad()
        m.loss(image, text, enc, mask, generator=g).backward()
        opt.step()
    end = eval_loss()
    assert end < start / 10, (start, end)


# ------------------------------------------------------------------ sampling
def test_sample_unit_norm_and_reproducible():
    m = model()
    _, text, enc, mask = batch()
    s1 = m.sample(text, enc, mask, generator=torch.Generator().manual_seed(7))
    s2 = m.sample(text, enc, mask, generator=torch.Generator().manual_seed(7))
    s3 = m.sample(text, enc, mask, generator=torch.Generator().manual_seed(8))
    assert s1.shape == (4, D)
    torch.testing.assert_close(s1.norm(dim=-1), torch.ones(4))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    guided = m.sample(text, enc, mask, guidance_scale=3.0, sampler="ddpm", steps=4, generator=torch.Generator().manual_seed(7))
    assert torch.isfinite(guided).all()
    torch.testing.assert_close(guided.norm(dim=-1), torch.ones(4))


def test_sample_keeps_the_candidate_closest_to_the_text():
    m = model()
    _, text, enc, mask = batch()
    picked = m.sample(text, enc, mask, candidates=2, generator=torch.Generator().manual_seed(1))
    # the same 2 candidates per caption, drawn one per row with the same noise
    rep = lambda x: x.repeat_interleave(2, dim=0)
    both = m.sample(rep(text), rep(enc), rep(mask), candidates=1, generator=torch.Generator().manual_seed(1))
    both = both.view(4, 2, D)
    dots = torch.einsum("bkd,bd->bk", both, text)
    assert (dots[:, 0] != dots[:, 1]).all()
    torch.testing.assert_close(picked, both[torch.arange(4), dots.argmax(dim=1)])


def test_select_candidates():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cands = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
    assert torch.equal(select_candidates(cands, text), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


# ------------------------------------------------------------------ configs
def test_demo_config_builds_a_tiny_prior():
    path = ROOT / "configs/demo/prior.yaml"
    job = yaml.safe_load(path.read_text())
    assert job["stage"] == "prior"
    cfg = build_config(DiffusionPriorConfig, job["model"], str(path))
    m = DiffusionPrior(cfg)
    assert sum(p.numel() for p in m.parameters()) < 2_000_000


def test_bad_drop_masks_are_rejected():
    m = model()
    image, text, enc, mask = batch()
    t = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="null_cond"):
        m(image, t, text_embed=text, text_encodings=enc, text_mask=mask, null_cond=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="cond_drop"):
        m(image, t, text_embed=text, text_encodings=enc, text_mask=mask, cond_drop={"text": torch.ones(4, dtype=torch.bool)})


def test_deepcopy_for_ema():
    import copy

    m = model()
    clone = copy.deepcopy(m)
    image, text, enc, mask = batch()
    t = torch.tensor([3, 4, 5, 6])
    kw = dict(text_embed=text, text_encodings=enc, text_mask=mask)
    torch.testing.assert_close(clone(image, t, **kw), m(image, t, **kw))


def test_full_precision_buffers_ignore_dtype_casts():
    from models.layers import FullPrecisionBuffers

    class Table(FullPrecisionBuffers):
        def __init__(self):
            super().__init__()
            self.register_buffer("values", torch.tensor([1.0 + 2**-12]))
            self.proj = torch.nn.Linear(2, 2)

    table = Table().to(torch.bfloat16)
    assert table.proj.weight.dtype == torch.bfloat16
    assert table.values.dtype == torch.float32 and table.values.item() == 1.0 + 2**-12
