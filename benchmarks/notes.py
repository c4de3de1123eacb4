"""The prose RESULTS.md carries with the numbers: how the sizes were matched, what differs, and,
for each row that can miss its target, what was tried and what limits it (printed only when
the row is below target in the run being written)."""

from __future__ import annotations

MATCHING = """\
Both implementations are built from one spec (`benchmarks/specs.py`) and fed the same tensors
(`make_prior_inputs` / `make_decoder_inputs`, same seed); the optimizer is the same
`torch.optim.AdamW` for both. No CLIP runs: both get precomputed embeddings and encodings.

Matched:
- Prior: width, depth, heads, head width, feed-forward multiplier; the same sequence of
  77 text tokens + 4 (their `max_text_len` is set to 77: left at its default of 256 it pads
  every caption to 256 tokens and runs the transformer over 260 positions instead of 81);
  x0 objective, cosine schedule, 1000 steps; text encodings with padding (zero rows for
  theirs, which derives its mask from them; a boolean mask for ours).
- Decoder: 64 px, base channels, channel multipliers, res blocks per level, self-attention at
  the same feature-map sizes with the same head width, norm groups, 4 image-embedding
  context tokens, the image embedding added to the time embedding, 77 text tokens projected to
  the same context width; eps objective with fixed variances (their `learned_variance=False`),
  3x3 stem and output convs (their 7x7 cross-embed stem and 1x1 output are switched to the
  same 3x3 convs).
- Sampling: DDIM, eta 0, 50 steps, no progress bars. Prior: one candidate per caption, no
  guidance (their `p_sample_loop`). Decoder: classifier-free guidance 3.0.

Differences that remain (architecture choices of each implementation, not switchable):
- Prior blocks: theirs use multi-query attention (one key/value head), cosine-similarity
  attention with rotary embeddings and a T5 relative-position bias, SwiGLU feed-forward
  (8x expansion before the gate), extra LayerNorms after attention and a final projection;
  ours are GPT-style pre-LN blocks (multi-head attention through SDPA, GELU MLP 4x). Theirs
  has ~20% more parameters and FLOPs per token at the same width; the MFU table charges each
  implementation its own counted FLOPs.
- Decoder UNet: theirs (an Imagen-style UNet) has one self-attention per level after its res
  blocks plus cross-attention to the conditioning tokens inside every res block below the top
  level, pixel-(un)shuffle resampling and a fixed head count; ours (ADM/GLIDE) has one
  attention layer after every res block at the attention resolutions, attending to the
  pixels and the context tokens in one softmax, with heads = channels / head width, and
  BigGAN-style resampling res blocks. Their head count is set to the heads ours uses at its
  largest attention resolution. Parameter counts are printed with each table.
- Guidance: ours runs the conditional and unconditional halves as one batch of 2B; theirs
  as two forward passes of B (same FLOPs).
- Their `DiffusionPrior.forward` scales `image_embed` in place, so it gets a fresh copy each
  step (a copy of a [32, 512] tensor, negligible).
"""

# row key -> what was tried and what limits it, shown when that row is below its target
BELOW_TARGET: dict[str, str] = {}
