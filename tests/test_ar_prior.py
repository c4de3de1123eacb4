"""The autoregressive prior and its PCA quantiser."""

import io

import pytest
import torch
import torch.nn.functional as F

from models.pca import PCAQuantizer, ScalarQuantizer, column_quantiles
from models.prior import ARPrior, ARPriorConfig

D, W, L = 16, 12, 8


def low_rank(n, dim, rank, seed=0, noise=0.0):
    """`[n, dim]` points on a random `rank`-dimensional affine subspace (decaying variances)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=g, dtype=torch.float64))[0].T  # [rank, dim]
    scales = torch.linspace(2.0, 1.0, rank, dtype=torch.float64)
    z = torch.randn(n, rank, generator=g, dtype=torch.float64) * scales
    x = z @ basis + torch.randn(dim, generator=g, dtype=torch.float64)
    return (x + noise * torch.randn(n, dim, generator=g, dtype=torch.float64)).float()


def tiny_cfg(**overrides) -> ARPriorConfig:
    base = dict(embed_dim=D, text_width=W, max_text_len=L, dim=32, depth=2, heads=2, dim_head=16,
                num_buckets=32, dot_buckets=8, max_components=8)
    base.update(overrides)
    return ARPriorConfig(**base)


def batch(b=4, length=5, valid=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, D, generator=g), dim=-1)
    text = F.normalize(torch.randn(b, D, generator=g), dim=-1)
    enc = torch.randn(b, length, W, generator=g)
    mask = torch.arange(length)[None].expand(b, length) < valid
    return image, text, enc, mask


def fitted_model(**overrides) -> ARPrior:
    torch.manual_seed(0)
    m = ARPrior(tiny_cfg(**overrides))
    x = F.normalize(low_rank(512, D, 5, seed=1, noise=0.01), dim=-1)
    t = F.normalize(x + 0.5 * torch.randn(512, D, generator=torch.Generator().manual_seed(2)), dim=-1)
    m.fit_pca(x, t)
    return m.eval()


# ------------------------------------------------------------------ PCA and quantiser
def test_pca_keeps_the_rank_of_low_rank_data():
    pca = PCAQuantizer(32, 32, 64, variance=0.99)
    x = low_rank(2000, 32, 5, noise=1e-4)
    assert pca.fit(x) == 5
    recon = pca.unproject(pca.project(x))
    assert (recon - x).norm() / (x - x.mean(0)).norm() < 1e-3
    assert torch.all(pca.explained_variance[:4] >= pca.explained_variance[1:5])  # decreasing order
    assert torch.all(pca.components[5:] == 0)


def test_pca_variance_threshold_and_cap():
    # independent coordinates with variances 8, 4, 2, 1, 0.5 (+ tiny): shares .516, .774, .903, .968, 1.0
    g = torch.Generator().manual_seed(0)
    stds = torch.tensor([8, 4, 2, 1, 0.5, 0.001]).sqrt()
    x = torch.randn(20000, 6, generator=g) * stds
    assert PCAQuantizer(6, 6, 16, variance=0.95).fit(x) == 4
    assert PCAQuantizer(6, 6, 16, variance=0.80).fit(x) == 3
    assert PCAQuantizer(6, 2, 16, variance=0.99).fit(x) == 2  # capped by max_components


def test_quantise_round_trip_and_equal_mass_codes():
    pca = PCAQuantizer(32, 32, 256, variance=0.99)
    x = low_rank(4096, 32, 5, noise=1e-4)
    pca.fit(x)
    codes = pca.quantize(x)
    assert codes.shape == (4096, 5) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 256
    rel = (pca.dequantize(codes) - x).norm() / (x - x.mean(0)).norm()
    assert rel < 0.05, rel  # 0.029 measured; the outermost equal-mass buckets dominate
    counts = torch.stack([torch.bincount(codes[:, j], minlength=256) for j in range(5)])
    assert counts.min() >= 14 and counts.max() <= 18  # 4096 / 256 = 16 per bucket
    assert torch.equal(pca.quantize(pca.dequantize(codes)), codes)  # bucket medians decode inside their bucket


def test_quantiser_errors_before_fit_and_on_bad_shapes():
    pca = PCAQuantizer(8, 8, 16)
    with pytest.raises(RuntimeError, match="not fitted"):
        pca.quantize(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        pca.fit(torch.randn(10, 7))
    with pytest.raises(ValueError, match="max_components"):
        PCAQuantizer(8, 9, 16)


def test_column_quantiles_match_torch_quantile():
    x = torch.randn(1001, 3, generator=torch.Generator().manual_seed(0))
    q = torch.tensor([0.0, 0.1, 0.5, 0.999, 1.0])
    torch.testing.assert_close(column_quantiles(x, q), torch.quantile(x, q, dim=0))


def test_scalar_quantiser_equal_mass():
    q = ScalarQuantizer(10)
    values = torch.rand(10000, generator=torch.Generator().manual_seed(0)) ** 3  # skewed
    q.fit(values)
    counts = torch.bincount(q(values), minlength=10)
    assert counts.min() >= 990 and counts.max() <= 1010


def test_state_dict_restores_the_fit_exactly_and_survives_a_bf16_cast():
    m = fitted_model()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = ARPrior(tiny_cfg())
    assert not fresh.fitted
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.pca.k == m.pca.k > 0
    for name in ("mean", "components", "edges", "centers"):
        assert torch.equal(getattr(fresh.pca, name), getattr(m.pca, name))
    assert torch.equal(fresh.dot_quantizer.edges, m.dot_quantizer.edges)
    _, text, enc, mask = batch()
    a = m.sample(text, enc, mask, generator=torch.Generator().manual_seed(0))
    b = fresh.eval().sample(text, enc, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    edges = m.pca.edges.clone()
    m.to(torch.bfloat16)  # mixed precision casts the weights, never the fit
    assert m.code_emb.weight.dtype == torch.bfloat16
    assert m.pca.edges.dtype == torch.float32 and torch.equal(m.pca.edges, edges)


# ------------------------------------------------------------------ AR prior: forward
def test_forward_shapes_and_causality():
    m = fitted_model()
    k = m.pca.k
    image, text, enc, mask = batch()
    codes = m.pca.quantize(image)
    dots = m.dot_quantizer((image * text).sum(-1))
    kw = dict(text_embed=text, dot_codes=dots, text_encodings=enc, text_mask=mask)
    logits = m(codes[:, :-1], **kw)
    assert logits.shape == (4, k, 32)
    changed = codes.clone()
    changed[:, 2] = (codes[:, 2] + 7) % 32
    other = m(changed[:, :-1], **kw)
    # logits[:, i] predicts code i from codes < i: a change in code 2 reaches logits 3.. only
    torch.testing.assert_close(other[:, :3], logits[:, :3])
    assert (other[:, 3:] - logits[:, 3:]).abs().amax() > 1e-4
    seq = m(codes[:, :-1], return_sequence=True, **kw)
    assert seq.shape == (4, 5 + 2 + k - 1, 32)


def test_padding_does_not_change_the_logits():
    m = fitted_model()
    image, text, enc, mask = batch(length=3, valid=3)
    codes, dots = m.pca.quantize(image), torch.tensor([1, 2, 3, 4])
    ref = m(codes[:, :-1], text_embed=text, dot_codes=dots, text_encodings=enc, text_mask=mask)
    longer = torch.cat([enc, 50 * torch.randn(4, 4, W)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(4, 4, dtype=torch.bool)], dim=1)
    out = m(codes[:, :-1], text_embed=text, dot_codes=dots, text_encodings=longer, text_mask=longer_mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_text_drop_and_null_cond():
    m = fitted_model(text_drop=1.0)
    image, text, enc, mask = batch()
    codes, dots = m.pca.quantize(image), torch.tensor([1, 2, 3, 4])
    kw = dict(text_embed=text, dot_codes=dots, text_encodings=enc, text_mask=mask)
    cond = m(codes[:, :-1], **kw)
    uncond = m(codes[:, :-1], null_cond=torch.ones(4, dtype=torch.bool), **kw)
    assert (cond - uncond).abs().amax() > 1e-4
    m.train()
    torch.testing.assert_close(m(codes[:, :-1], **kw), uncond)
    torch.testing.assert_close(m(codes[:, :-1], null_cond=torch.zeros(4, dtype=torch.bool), **kw), cond)


def test_loss_requires_a_fit():
    m = ARPrior(tiny_cfg())
    image, text, enc, mask = batch()
    with pytest.raises(RuntimeError, match="fit_pca"):
        m.loss(image, text, enc, mask)


def test_overfits_a_fixed_batch():
    m = fitted_model(text_drop=0.0)
    m.train()
    image, text, enc, mask = batch(b=8, seed=3)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    start = m.loss(image, text, enc, mask).item()
    for _ in range(150):
        opt.zero_grad()
        m.loss(image, text, enc, mask).backward()
        opt.step()
    end = m.loss(image, text, enc, mask).item()
    assert end < start / 10, (start, end)


# ------------------------------------------------------------------ sampling
def test_sample_unit_norm_reproducible_and_guided():
    m = fitted_model()
    _, text, enc, mask = batch()
    s1 = m.sample(text, enc, mask, generator=torch.Generator().manual_seed(5))
    s2 = m.sample(text, enc, mask, generator=torch.Generator().manual_seed(5))
    s3 = m.sample(text, enc, mask, generator=torch.Generator().manual_seed(6))
    assert s1.shape == (4, D)
    torch.testing.assert_close(s1.norm(dim=-1), torch.ones(4))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    g = m.sample(text, enc, mask, guidance_scale=3.0, top_k=4, temperature=0.7, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(4))


def test_cached_greedy_sampling_matches_recomputation():
    m = fitted_model()
    _, text, enc, mask = batch()
    gen = torch.Generator().manual_seed(0)
    sampled = m.sample(text, enc, mask, temperature=0.0, generator=gen)
    dots = m.draw_dot_codes(4, torch.device("cpu"), torch.Generator().manual_seed(0))
    codes = torch.zeros(4, 0, dtype=torch.long)
    for _ in range(m.pca.k):  # no cache: the whole sequence each step
        logits = m(codes, text_embed=text, dot_codes=dots, text_encodings=enc, text_mask=mask)
        codes = torch.cat([codes, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    torch.testing.assert_close(sampled, F.normalize(m.pca.dequantize(codes), dim=-1))


def test_dot_codes_come_from_the_upper_quantiles():
    m = fitted_model(dot_buckets=8, sample_dot_quantile=0.5)
    codes = m.draw_dot_codes(2000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert codes.min() == 4 and codes.max() == 7
    top = m.draw_dot_codes(100, torch.device("cpu"), quantile=1.0)
    assert torch.all(top == 7)


# ------------------------------------------------------------------ the stage's fit (its preparation)
def _pairs(n, seed=1):
    x = F.normalize(low_rank(n, D, 4, seed=seed, noise=0.05), dim=-1)
    t = F.normalize(x + 0.5 * torch.randn(n, D, generator=torch.Generator().manual_seed(seed + 1)), dim=-1)
    return x, t


def _batches(x, t, size=300):
    return ({"image_embed": x[i : i + size], "text_embed": t[i : i + size]} for i in range(0, len(x), size))


def test_stage_fit_uses_the_first_fit_embeddings_and_fills_every_bucket():
    from models.prior import PCA_FIT_PER_BUCKET
    from models.stages.prior import fit_pca

    cfg = tiny_cfg(num_buckets=16, dot_buckets=8, max_components=4)
    assert cfg.fit_embeddings == PCA_FIT_PER_BUCKET * 16 == 1600  # the finer quantiser sets the count
    x, t = _pairs(2000)
    model = ARPrior(cfg)
    fit_pca(model, _batches(x, t))
    reference = ARPrior(cfg)
    reference.fit_pca(x[:1600], t[:1600])  # the first 1600, across batch boundaries
    for name, buffer in reference.state_dict().items():
        if "pca" in name or "dot_quantizer" in name:
            assert torch.equal(model.state_dict()[name], buffer), name
    codes = model.pca.quantize(x[:1600])
    counts = torch.stack([torch.bincount(codes[:, j], minlength=16) for j in range(model.pca.k)])
    assert counts.min() >= PCA_FIT_PER_BUCKET - 1, counts  # equal mass: 100 a bucket, +-1 at an edge
    dots = model.dot_quantizer((x[:1600] * t[:1600]).sum(-1))
    assert torch.bincount(dots, minlength=8).min() >= 1600 // 8 - 1


def test_stage_fit_on_too_little_data_says_how_much_there_is():
    from models.config import ConfigError
    from models.stages.prior import fit_pca

    x, t = _pairs(900)
    with pytest.raises(ConfigError, match=r"fits its PCA and buckets on 1600 .* holds 900"):
        fit_pca(ARPrior(tiny_cfg(num_buckets=16, dot_buckets=8, max_components=4)), _batches(x, t))
    with pytest.raises(ValueError, match="at least one per bucket"):
        tiny_cfg(num_buckets=16, pca_fit_embeddings=10)
    assert tiny_cfg(num_buckets=16, pca_fit_embeddings=500).fit_embeddings == 500


def test_dot_buckets_fit_from_dot_products_equals_from_text_embeddings():
    x, t = _pairs(512)
    a, b = ARPrior(tiny_cfg()), ARPrior(tiny_cfg())
    a.fit_pca(x, t)
    b.fit_pca(x, dots=(x * t).sum(-1))
    assert torch.equal(a.dot_quantizer.edges, b.dot_quantizer.edges) and torch.equal(a.pca.edges, b.pca.edges)
