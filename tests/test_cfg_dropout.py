"""The priors' classifier-free-guidance dropout: the null condition at the paper's rate.

unCLIP (sec. 2.2) drops the prior's text conditioning 10% of the time; guidance contrasts the
caption against that fully unconditional input, so it must be trained at that rate. Both
priors draw the drops the same way (`models.text_conditioning.draw_text_drop`): the caption and
its text embedding together with `text_drop`, each alone on top with an extra rate. These
tests count drops over many draws of a fixed generator and check every rate within 5 binomial
standard deviations.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from launch.config_files import load_config
from models.diffusion import DiffusionConfig
from models.prior import ARPrior, ARPriorConfig, DiffusionPrior, DiffusionPriorConfig

D, W, L = 16, 12, 6
DRAWS = 40_000
SMALL = dict(embed_dim=D, text_width=W, max_text_len=L, dim=32, depth=1, heads=2, dim_head=16)


def _prior(kind: str, **drops) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "diffusion":
        return DiffusionPrior(DiffusionPriorConfig(**SMALL, **drops, diffusion=DiffusionConfig(timesteps=100, objective="x0")))
    m = ARPrior(ARPriorConfig(**SMALL, **drops, num_buckets=16, dot_buckets=8, max_components=4))
    x = F.normalize(torch.randn(256, D, generator=torch.Generator().manual_seed(1)), dim=-1)
    m.fit_pca(x, F.normalize(x + torch.randn(256, D, generator=torch.Generator().manual_seed(2)), dim=-1))
    return m


def _assert_rate(mask: torch.Tensor, p: float, what: str) -> None:
    observed = mask.float().mean().item()
    tolerance = 5 * math.sqrt(p * (1 - p) / mask.numel()) + 1e-9
    assert abs(observed - p) <= tolerance, f"{what}: observed {observed:.4f}, expected {p:.4f} +- {tolerance:.4f}"


def _draw(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return m.draw_cond_drop(DRAWS, torch.device("cpu"), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["diffusion", "autoregressive"])
def test_paper_default_drops_the_caption_and_its_embedding_together_10_percent(kind):
    drop = _draw(_prior(kind))
    assert torch.equal(drop["text_encodings"], drop["text_embed"])  # never one without the other
    _assert_rate(drop["text_encodings"] & drop["text_embed"], 0.1, "fully unconditional rows")


@pytest.mark.parametrize("kind", ["diffusion", "autoregressive"])
def test_extra_independent_drops_come_on_top_of_the_joint_one(kind):
    p, e, m = 0.1, 0.3, 0.2
    drop = _draw(_prior(kind, text_drop=p, text_encodings_drop=e, text_embed_drop=m))
    enc, emb = drop["text_encodings"], drop["text_embed"]
    _assert_rate(enc, p + (1 - p) * e, "caption encodings dropped")
    _assert_rate(emb, p + (1 - p) * m, "text embedding dropped")
    _assert_rate(enc & emb, p + (1 - p) * e * m, "both dropped")
    _assert_rate(enc & ~emb, (1 - p) * e * (1 - m), "encodings alone")
    _assert_rate(~enc & emb, (1 - p) * (1 - e) * m, "embedding alone")


@pytest.mark.parametrize("kind", ["diffusion", "autoregressive"])
def test_a_fully_dropped_row_is_exactly_guidances_null_input(kind):
    m = _prior(kind, text_drop=1.0)
    g = torch.Generator().manual_seed(3)
    text = F.normalize(torch.randn(4, D, generator=g), dim=-1)
    enc, mask = torch.randn(4, L, W, generator=g), torch.arange(L)[None].expand(4, -1) < 4
    if kind == "diffusion":
        args, kw = (torch.randn(4, D, generator=g), torch.tensor([1, 20, 40, 80])), {}
    else:
        args, kw = (m.pca.quantize(text)[:, :-1],), {"dot_codes": torch.tensor([0, 2, 4, 6])}
    kw.update(text_embed=text, text_encodings=enc, text_mask=mask)
    null = m.eval()(*args, null_cond=torch.ones(4, dtype=torch.bool), **kw)
    torch.testing.assert_close(m.train()(*args, **kw), null)


@pytest.mark.parametrize("kind", ["diffusion", "autoregressive"])
def test_the_training_loss_applies_the_counted_drops(kind):
    """The loss draws its dropout first from the generator: the masks counted above are those
    the training step uses (the loss with them given explicitly is the same number)."""
    m = _prior(kind, text_drop=0.5).train()
    g = torch.Generator().manual_seed(4)
    image = F.normalize(torch.randn(8, D, generator=g), dim=-1)
    text = F.normalize(torch.randn(8, D, generator=g), dim=-1)
    enc, mask = torch.randn(8, L, W, generator=g), torch.ones(8, L, dtype=torch.bool)
    loss = m.loss(image, text, enc, mask, generator=torch.Generator().manual_seed(9))
    replay = torch.Generator().manual_seed(9)
    drop = m.draw_cond_drop(8, torch.device("cpu"), replay)
    assert 0 < int(drop["text_embed"].sum()) < 8
    cond = {"text_embed": text, "text_encodings": enc, "text_mask": mask, "cond_drop": drop}
    if kind == "diffusion":
        expected = m.diffusion.loss(m, m.embedding_space.to_diffusion(image), cond=cond, generator=replay)
    else:
        codes = m.pca.quantize(image)
        dots = m.dot_quantizer((image * text).sum(-1))
        logits = m(codes[:, :-1], dot_codes=dots, **cond)
        expected = F.cross_entropy(logits.flatten(0, 1).float(), codes.flatten())
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("name", ["prior", "prior_ar", "../demo/prior"])
def test_shipped_priors_train_the_null_condition_at_10_percent(name):
    model = load_config(f"configs/paper/{name}.yaml").model
    assert (model.text_drop, model.text_encodings_drop, model.text_embed_drop) == (0.1, 0.0, 0.0)
