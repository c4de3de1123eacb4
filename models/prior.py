"""The priors: text -> CLIP image embedding (diffusion prior and autoregressive prior)."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from pydantic import Field
from torch import Tensor, nn

from models.config import PositiveFloat, PositiveInt, Probability, config_dataclass
from models.diffusion import DiffusionConfig, GaussianDiffusion
from models.embedding_space import ClipEmbeddings, EmbeddingSpace
from models.layers import timestep_embedding
from models.pca import PCAQuantizer, ScalarQuantizer
from models.text_conditioning import NullText, TextConditioning, check_text_inputs, draw_text_drop, resolve_cond_drop
from models.transformer import CausalTransformer, KVCache, init_weights


def _prior_diffusion() -> DiffusionConfig:
    # The paper's prior predicts the clean embedding directly (x0), 1000 steps, 64 at sampling.
    return DiffusionConfig(timesteps=1000, schedule="cosine", objective="x0", sample_steps=64)


@config_dataclass
class DiffusionPriorConfig:
    """Causal transformer over [text encodings, text embed, time, noised image embed, query]."""

    kind: Literal["diffusion"] = "diffusion"
    embed_dim: PositiveInt = 512  # CLIP embedding size D
    text_width: PositiveInt = 512  # width W of CLIP's per-token text encodings
    max_text_len: PositiveInt = 77
    dim: PositiveInt = 512
    depth: PositiveInt = 6
    heads: PositiveInt = 8
    dim_head: PositiveInt = 64
    ff_mult: PositiveInt = 4
    dropout: Probability = 0.0
    use_text_encodings: bool = True
    # classifier-free guidance dropout (`models.text_conditioning.draw_text_drop`): the caption
    # and its text embedding together (the null condition; unCLIP sec. 2.2: 10%), and each
    # alone on top of that (independent extras; none in the paper)
    text_drop: Probability = 0.1
    text_encodings_drop: Probability = 0.0
    text_embed_drop: Probability = 0.0
    # CLIP embeddings are unit-norm; scaled by sqrt(embed_dim) (None) their entries have unit
    # variance like the noise they are mixed with. "stats": 1 / (mean per-dimension std) of the
    # training embeddings, resolved into a number from precompute's stats.json by `unclip train`.
    image_embed_scale: Optional[Union[PositiveFloat, Literal["stats"]]] = None
    sample_candidates: PositiveInt = 2  # paper: draw 2, keep the one closest to the text embed
    diffusion: DiffusionConfig = Field(default_factory=_prior_diffusion)
    # `unit`: unit-norm embeddings, scaled as above; `raw` (Karlo): CLIP's unnormalised
    # embeddings, standardised per dimension by the training set's mean and std
    clip_embeddings: ClipEmbeddings = "unit"
    # what replaces a dropped caption: learned null tokens, or the empty caption's CLIP outputs
    null_text: NullText = "learned"
    qkv_bias: bool = False  # biases on the attention's query/key/value projections (Karlo: yes)

    def __post_init__(self) -> None:
        if self.diffusion.learn_sigma:
            raise ValueError(
                "diffusion.learn_sigma: not available for the prior (its VLB's decoder term is the "
                "discretized likelihood of 8-bit images; the prior samples with fixed variances)"
            )


# Equal-mass buckets put N / num_buckets fitted embeddings in each bucket; a bucket's edges
# and median are quantiles estimated from those, whose error shrinks as 1/sqrt(count): 100
# per bucket keeps it near a tenth of a bucket's width (102,400 embeddings for 1024 buckets,
# ~0.4 GB of float32 for D = 1024).
PCA_FIT_PER_BUCKET = 100


@config_dataclass
class ARPriorConfig:
    """Decoder-only transformer over PCA-reduced, quantised image-embedding tokens."""

    kind: Literal["autoregressive"] = "autoregressive"
    embed_dim: PositiveInt = 512
    text_width: PositiveInt = 512
    max_text_len: PositiveInt = 77
    dim: PositiveInt = 512
    depth: PositiveInt = 6
    heads: PositiveInt = 8
    dim_head: PositiveInt = 64
    ff_mult: PositiveInt = 4
    dropout: Probability = 0.0
    pca_variance: Probability = 0.99  # keep the components holding this share of variance
    max_components: Optional[PositiveInt] = None
    num_buckets: PositiveInt = 1024
    dot_buckets: PositiveInt = 1024  # quantised "dot product with the text embedding" token
    # training embeddings the PCA and both sets of buckets are fitted on (the stage's
    # preparation); None: PCA_FIT_PER_BUCKET per bucket of the finer quantiser
    pca_fit_embeddings: Optional[PositiveInt] = None
    # classifier-free guidance dropout, as the diffusion prior's (`draw_text_drop`): the whole
    # caption (unCLIP sec. 2.2: 10%), and its encodings or embedding alone on top (none in the paper)
    text_drop: Probability = 0.1
    text_encodings_drop: Probability = 0.0
    text_embed_drop: Probability = 0.0
    use_text_encodings: bool = True
    # sampling conditions on a dot-product code from above this quantile of the training
    # distribution; unCLIP swept 0.5/0.7/0.85/0.95 and found 0.5 best (Sec. 2.2, footnote 2)
    sample_dot_quantile: Probability = 0.5

    def __post_init__(self) -> None:
        if self.max_components is not None and self.max_components > self.embed_dim:
            raise ValueError(
                f"max_components ({self.max_components}) must be <= embed_dim ({self.embed_dim})"
            )
        if self.num_buckets < 2 or self.dot_buckets < 2:
            raise ValueError(
                f"num_buckets and dot_buckets must be >= 2, got {self.num_buckets} and {self.dot_buckets}"
            )
        buckets = max(self.num_buckets, self.dot_buckets)
        if self.pca_fit_embeddings is not None and self.pca_fit_embeddings < buckets:
            raise ValueError(
                f"pca_fit_embeddings ({self.pca_fit_embeddings}) must be at least one per bucket ({buckets}); "
                f"the default, {PCA_FIT_PER_BUCKET * buckets}, puts {PCA_FIT_PER_BUCKET} in each"
            )

    @property
    def fit_embeddings(self) -> int:
        """How many training embeddings the PCA and buckets are fitted on."""
        return self.pca_fit_embeddings or PCA_FIT_PER_BUCKET * max(self.num_buckets, self.dot_buckets)


# ===================================================================== diffusion prior
class DiffusionPrior(nn.Module):
    """unCLIP's diffusion prior: a causal transformer over
    `[text encodings..., text embed, timestep, noised image embed, query]` whose output at the
    query, projected to `embed_dim`, is the prediction (`cfg.diffusion.objective`, x0 by default).

    The diffusion runs in `embedding_space` (`cfg.clip_embeddings`): unit-norm embeddings
    scaled by `image_embed_scale` (default sqrt(D)), or raw ones standardised by the training
    set's statistics (Karlo); `loss` and `sample` take and return CLIP embeddings of that kind.
    """

    cond_names = ("text_encodings", "text_embed")
    sampling_options = ("guidance_scale", "steps", "sampler", "eta", "candidates")

    def __init__(self, cfg: DiffusionPriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        if cfg.image_embed_scale == "stats":
            raise ValueError("image_embed_scale: 'stats' must be resolved into a number first (`unclip train` does, "
                             "from the embeddings' stats.json)")
        raw = cfg.clip_embeddings == "raw"
        scale = float(cfg.image_embed_scale or math.sqrt(cfg.embed_dim))
        self.embedding_space = EmbeddingSpace(cfg.embed_dim, cfg.clip_embeddings, scale)
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        self.text = TextConditioning(
            cfg.embed_dim, cfg.text_width, cfg.max_text_len, dim, cfg.use_text_encodings,
            embed_scale=1.0 if raw else None, null_text=cfg.null_text,
        )
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.image_proj = nn.Linear(cfg.embed_dim, dim)
        self.query = nn.Parameter(torch.randn(dim) * 0.02)
        # fixed positions for the 4 trailing tokens, so padding the text changes nothing
        self.tail_pos = nn.Parameter(torch.randn(4, dim) * 0.02)
        self.transformer = CausalTransformer(dim, cfg.depth, cfg.heads, cfg.dim_head, cfg.ff_mult, cfg.dropout, cfg.qkv_bias)
        self.to_out = nn.Linear(dim, cfg.embed_dim)
        init_weights(self)

    def draw_cond_drop(
        self, batch: int, device: torch.device, generator: Optional[torch.Generator] = None
    ) -> dict[str, Tensor]:
        """Training-time CFG dropout: `{"text_encodings": [B] bool, "text_embed": [B] bool}`,
        both together with `text_drop`, each alone with its extra rate (`draw_text_drop`)."""
        return draw_text_drop(self.cfg, batch, device, generator)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        *,
        text_embed: Tensor,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        null_cond: Optional[Tensor] = None,
        cond_drop: Optional[dict[str, Tensor]] = None,
        return_sequence: bool = False,
    ) -> Tensor:
        """`x_t`: noised scaled image embeds `[B, D]`; `t`: `[B]` long; `text_embed`: `[B, D]`
        unit-norm; `text_encodings`: `[B, L, W]`, `text_mask`: `[B, L]` bool (True = token).
        `null_cond` `[B]` bool drops every condition; `cond_drop` gives explicit per-condition
        masks (else drawn while training). Returns `[B, D]`, or the transformer's outputs
        `[B, L + 4, dim]` with `return_sequence`."""
        batch, cfg = x_t.shape[0], self.cfg
        if x_t.shape != (batch, cfg.embed_dim) or t.shape != (batch,):
            raise ValueError(
                f"DiffusionPrior: x_t must be [B, {cfg.embed_dim}] and t [B], got {tuple(x_t.shape)} and {tuple(t.shape)}"
            )
        check_text_inputs("DiffusionPrior", batch, cfg, text_embed, text_encodings, text_mask)
        drop = resolve_cond_drop(self, batch, x_t.device, null_cond, cond_drop)
        text_tokens, keep, embed_token = self.text(
            text_embed, text_encodings, text_mask, drop["text_encodings"], drop["text_embed"]
        )
        dtype = embed_token.dtype
        time_token = self.time_mlp(timestep_embedding(t, cfg.dim).to(dtype))
        image_token = self.image_proj(x_t.to(dtype))
        query = repeat(self.query.to(dtype), "d -> b d", b=batch)
        tail = torch.stack([embed_token, time_token, image_token, query], dim=1) + self.tail_pos.to(dtype)
        seq = torch.cat([text_tokens, tail], dim=1)
        keep = torch.cat([keep, torch.ones(batch, 4, dtype=torch.bool, device=keep.device)], dim=1)
        if return_sequence:
            return self.transformer(seq, keep)
        return self.to_out(self.transformer(seq, keep, last=1)[:, -1])

    def loss(
        self,
        image_embed: Tensor,
        text_embed: Tensor,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Diffusion loss (float32 scalar) on unit-norm `image_embed` `[B, D]` given the caption;
        `generator` makes t, the noise and (in training mode) the CFG dropout reproducible."""
        batch = image_embed.shape[0]
        if image_embed.shape != (batch, self.cfg.embed_dim):
            raise ValueError(f"DiffusionPrior.loss: image_embed must be [B, {self.cfg.embed_dim}], got {tuple(image_embed.shape)}")
        cond = {"text_embed": text_embed, "text_encodings": text_encodings, "text_mask": text_mask}
        if self.training:
            cond["cond_drop"] = self.draw_cond_drop(batch, image_embed.device, generator)
        return self.diffusion.loss(self, self.embedding_space.to_diffusion(image_embed), cond=cond, generator=generator)

    @torch.no_grad()
    def sample(
        self,
        text_embed: Tensor,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        *,
        guidance_scale: Optional[float] = None,
        steps: Optional[int] = None,
        sampler: Optional[str] = None,
        eta: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        candidates: Optional[int] = None,
    ) -> Tensor:
        """Unit-norm image embeddings `[B, D]` for the captions. With `candidates` k > 1, k
        samples per caption are drawn in one batch and the one with the highest dot product with
        the text embedding is kept (unCLIP Sec. 2.2). Defaults come from the config."""
        dc = self.cfg.diffusion
        k = self.cfg.sample_candidates if candidates is None else int(candidates)
        if k < 1:
            raise ValueError(f"DiffusionPrior.sample: candidates must be >= 1, got {k}")
        batch = text_embed.shape[0]

        def rep(x: Optional[Tensor]) -> Optional[Tensor]:
            return None if x is None else x.repeat_interleave(k, dim=0)

        def denoise(x_t: Tensor, t: Tensor, null_cond: Optional[Tensor] = None, **cond: Any) -> Tensor:
            # sampling never draws training-time dropout, whatever mode the module is in
            if null_cond is None:
                null_cond = torch.zeros(x_t.shape[0], dtype=torch.bool, device=x_t.device)
            return self(x_t, t, null_cond=null_cond, **cond)

        cond = {"text_embed": rep(text_embed), "text_encodings": rep(text_encodings), "text_mask": rep(text_mask)}
        x0 = self.diffusion.sample(
            denoise,
            (batch * k, self.cfg.embed_dim),
            cond=cond,
            steps=steps or dc.sample_steps,
            sampler=sampler or dc.sampler,
            eta=dc.eta if eta is None else eta,
            guidance_scale=dc.guidance_scale if guidance_scale is None else guidance_scale,
            clip_x0=dc.clip_x0,
            dynamic_threshold_percentile=dc.dynamic_threshold_percentile,
            clip_range=dc.clip_range,
            generator=generator,
            device=text_embed.device,
        )
        embeds = self.embedding_space.from_diffusion(x0)
        return select_candidates(rearrange(embeds, "(b k) d -> b k d", k=k), text_embed)


def select_candidates(candidates: Tensor, text_embed: Tensor) -> Tensor:
    """From `candidates` `[B, k, D]` keep, per row, the one with the highest cosine similarity
    (for unit-norm embeddings: dot product) with `text_embed` `[B, D]` -> `[B, D]`."""
    if candidates.shape[1] == 1:
        return candidates[:, 0]
    scores = torch.einsum("bkd,bd->bk", F.normalize(candidates, dim=-1), F.normalize(text_embed.to(candidates.dtype), dim=-1))
    best = scores.argmax(dim=1)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), best]


# ===================================================================== autoregressive prior
class ARPrior(nn.Module):
    """unCLIP's autoregressive prior: the image embedding as PCA codes (`fit_pca` first),
    predicted by a causal transformer over
    `[text encodings..., text embed, dot-product code, code_0, ..., code_{k-2}]`,
    the output at each position predicting the next code.

    The dot-product token is the quantised `image_embed . text_embed`; sampling conditions on
    a code drawn from the top `1 - sample_dot_quantile` of its training distribution.
    """

    cond_names = ("text_encodings", "text_embed")
    sampling_options = ("guidance_scale", "temperature", "top_k", "dot_quantile")

    def __init__(self, cfg: ARPriorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        max_k = min(cfg.max_components or cfg.embed_dim, cfg.embed_dim)
        self.pca = PCAQuantizer(cfg.embed_dim, max_k, cfg.num_buckets, cfg.pca_variance)
        self.dot_quantizer = ScalarQuantizer(cfg.dot_buckets)
        self.text = TextConditioning(cfg.embed_dim, cfg.text_width, cfg.max_text_len, dim, cfg.use_text_encodings)
        self.dot_emb = nn.Embedding(cfg.dot_buckets, dim)
        self.code_emb = nn.Embedding(cfg.num_buckets, dim)
        # positions after the text: text embed, dot code, then one per PCA component (an
        # Embedding, looked up through its own forward, so ZeRO-3 gathers it in `sample` too)
        self.pos_emb = nn.Embedding(2 + max_k, dim)
        self.transformer = CausalTransformer(dim, cfg.depth, cfg.heads, cfg.dim_head, cfg.ff_mult, cfg.dropout)
        self.to_logits = nn.Linear(dim, cfg.num_buckets)
        init_weights(self)

    @property
    def fitted(self) -> bool:
        return self.pca.fitted

    @torch.no_grad()
    def fit_pca(
        self, image_embeds: Tensor, text_embeds: Optional[Tensor] = None, *, dots: Optional[Tensor] = None
    ) -> int:
        """Fit the PCA and code buckets on training image embeddings `[N, D]`; with the paired
        `text_embeds` `[N, D]` (or their dot products with the images, `dots` `[N]`, which
        need no second `[N, D]` copy) also fit the dot-product buckets to the data (equal
        mass; else they stay uniform over [-1, 1]). Returns the number of components kept."""
        k = self.pca.fit(image_embeds)
        if dots is not None:
            if dots.shape != image_embeds.shape[:1]:
                raise ValueError(f"ARPrior.fit_pca: dots {tuple(dots.shape)} must be [{image_embeds.shape[0]}]")
            self.dot_quantizer.fit(dots)
        elif text_embeds is not None:
            if text_embeds.shape != image_embeds.shape:
                raise ValueError(
                    f"ARPrior.fit_pca: text_embeds {tuple(text_embeds.shape)} must match image_embeds {tuple(image_embeds.shape)}"
                )
            self.dot_quantizer.fit((image_embeds.float() * text_embeds.float()).sum(-1))
        return k

    def draw_cond_drop(
        self, batch: int, device: torch.device, generator: Optional[torch.Generator] = None
    ) -> dict[str, Tensor]:
        """Training-time CFG dropout, as the diffusion prior's: `{"text_encodings": [B] bool,
        "text_embed": [B] bool}`, both together with `text_drop` (`draw_text_drop`)."""
        return draw_text_drop(self.cfg, batch, device, generator)

    def _prefix(self, text_embed, text_encodings, text_mask, dot_codes, drop) -> tuple[Tensor, Tensor]:
        """`[text encodings..., text embed, dot code]` tokens and their key mask. A dropped
        caption keeps its dot-product token: guidance then contrasts caption against no caption
        at the same requested image-text agreement."""
        tokens, keep, embed_token = self.text(text_embed, text_encodings, text_mask, drop["text_encodings"], drop["text_embed"])
        dtype = embed_token.dtype
        tail = torch.stack([embed_token, self.dot_emb(dot_codes).to(dtype)], dim=1) + self._positions(0, 2, dtype)
        keep = torch.cat([keep, torch.ones(keep.shape[0], 2, dtype=torch.bool, device=keep.device)], dim=1)
        return torch.cat([tokens, tail], dim=1), keep

    def _positions(self, start: int, count: int, dtype: torch.dtype) -> Tensor:
        idx = torch.arange(start, start + count, device=self.pos_emb.weight.device)
        return self.pos_emb(idx).to(dtype)

    def _code_tokens(self, codes: Tensor, start: int) -> Tensor:
        emb = self.code_emb(codes)
        return emb + self._positions(2 + start, codes.shape[1], emb.dtype)

    def forward(
        self,
        codes: Tensor,
        *,
        text_embed: Tensor,
        dot_codes: Tensor,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        null_cond: Optional[Tensor] = None,
        cond_drop: Optional[dict[str, Tensor]] = None,
        return_sequence: bool = False,
    ) -> Tensor:
        """`codes`: the first n image codes `[B, n]` (teacher forcing, n < max components);
        `dot_codes`: `[B]`. Returns logits `[B, n + 1, num_buckets]` for codes 0..n, or the
        transformer's outputs `[B, L + 2 + n, dim]` with `return_sequence`."""
        batch, n = codes.shape
        check_text_inputs("ARPrior", batch, self.cfg, text_embed, text_encodings, text_mask)
        if n >= self.pca.max_components or dot_codes.shape != (batch,):
            raise ValueError(
                f"ARPrior: codes must be [B, n < {self.pca.max_components}] and dot_codes [B]; "
                f"got {tuple(codes.shape)} and {tuple(dot_codes.shape)}"
            )
        drop = resolve_cond_drop(self, batch, codes.device, null_cond, cond_drop)
        prefix, keep = self._prefix(text_embed, text_encodings, text_mask, dot_codes, drop)
        seq = torch.cat([prefix, self._code_tokens(codes, 0)], dim=1)
        keep = torch.cat([keep, torch.ones(batch, n, dtype=torch.bool, device=keep.device)], dim=1)
        if return_sequence:
            return self.transformer(seq, keep)
        return self.to_logits(self.transformer(seq, keep, last=n + 1))

    def loss(
        self,
        image_embed: Tensor,
        text_embed: Tensor,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Teacher-forced cross-entropy (float32 scalar, nats per code) of the image embedding's
        codes given the caption and the true dot-product code."""
        if not self.fitted:
            raise RuntimeError("ARPrior.loss: the PCA is not fitted; call fit_pca(image_embeds, text_embeds) first")
        codes = self.pca.quantize(image_embed.float())
        dot_codes = self.dot_quantizer((image_embed.float() * text_embed.float()).sum(-1))
        drop = self.draw_cond_drop(codes.shape[0], codes.device, generator) if self.training else None
        logits = self(
            codes[:, :-1], text_embed=text_embed, dot_codes=dot_codes,
            text_encodings=text_encodings, text_mask=text_mask, cond_drop=drop,
        )
        return F.cross_entropy(rearrange(logits.float(), "b n c -> (b n) c"), codes.flatten())

    def draw_dot_codes(
        self, batch: int, device: torch.device, generator: Optional[torch.Generator] = None, quantile: Optional[float] = None
    ) -> Tensor:
        """Dot-product codes `[B]` drawn uniformly from the top `1 - quantile` of the (equal-mass)
        buckets; the paper found the top half best (its footnote 2)."""
        q = self.cfg.sample_dot_quantile if quantile is None else quantile
        nb = self.cfg.dot_buckets
        low = min(int(math.floor(q * nb)), nb - 1)
        gen_device = generator.device if generator is not None else device
        return torch.randint(low, nb, (batch,), generator=generator, device=gen_device).to(device)

    @torch.no_grad()
    def sample(
        self,
        text_embed: Tensor,
        text_encodings: Optional[Tensor] = None,
        text_mask: Optional[Tensor] = None,
        *,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        guidance_scale: float = 1.0,
        generator: Optional[torch.Generator] = None,
        dot_quantile: Optional[float] = None,
    ) -> Tensor:
        """Unit-norm image embeddings `[B, D]`: codes one at a time with a key/value cache,
        classifier-free guidance on the logits (`uncond + s * (cond - uncond)`), temperature
        (0: greedy) and top-k, then bucket medians, inverse PCA, L2 normalisation."""
        if not self.fitted:
            raise RuntimeError("ARPrior.sample: the PCA is not fitted; call fit_pca first or load a fitted state dict")
        batch, device = text_embed.shape[0], text_embed.device
        check_text_inputs("ARPrior.sample", batch, self.cfg, text_embed, text_encodings, text_mask)
        dot_codes = self.draw_dot_codes(batch, device, generator, dot_quantile)
        guided = guidance_scale != 1.0
        copies = 2 if guided else 1

        def rep(x: Optional[Tensor]) -> Optional[Tensor]:
            return None if x is None else torch.cat([x] * copies)

        null = torch.arange(copies * batch, device=device) >= batch
        prefix, keep = self._prefix(rep(text_embed), rep(text_encodings), rep(text_mask), rep(dot_codes), {"text_encodings": null, "text_embed": null})
        cache = KVCache(self.cfg.depth)
        hidden = self.transformer(prefix, keep, cache)[:, -1]
        codes = []
        for j in range(self.pca.k):
            logits = self.to_logits(hidden).float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + guidance_scale * (cond - uncond)
            code = _sample_logits(logits, temperature, top_k, generator)
            codes.append(code)
            if j + 1 < self.pca.k:
                step = self._code_tokens(rep(code)[:, None], j)
                ones = torch.ones(step.shape[0], 1, dtype=torch.bool, device=device)
                hidden = self.transformer(step, ones, cache)[:, -1]
        embeds = self.pca.dequantize(torch.stack(codes, dim=1))
        return F.normalize(embeds.float(), dim=-1)


def _sample_logits(logits: Tensor, temperature: float, top_k: Optional[int], generator: Optional[torch.Generator]) -> Tensor:
    """One code per row of `logits` `[B, C]`."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = logits.softmax(dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)
