"""models/clip.py: the open_clip adapter's conventions hold exactly."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from models.clip import ClipConfig, architecture, load_clip, load_clip_from_config

CAPTIONS = ["a large red circle on the left", "a small blue star at the top", "x"]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip("unclip-tiny")


def test_attributes_and_frozen(clip):
    assert (clip.embed_dim, clip.text_width, clip.image_size, clip.context_length) == (64, 64, 32, 32)
    assert clip.mean == open_clip.OPENAI_DATASET_MEAN and clip.std == open_clip.OPENAI_DATASET_STD
    assert all(not p.requires_grad for p in clip.parameters())
    clip.train()  # a parent's .train() must not unfreeze dropout/batchnorm behaviour
    assert not clip.training and not clip.model.training
    tower_params = sum(p.numel() for n, p in clip.model.named_parameters() if "token_embedding" not in n)
    assert tower_params < 500_000


def test_encode_text_matches_open_clip(clip):
    embed, encodings, mask = clip.encode_text(CAPTIONS)
    tokens = open_clip.get_tokenizer("unclip-tiny")(CAPTIONS)
    torch.testing.assert_close(embed, clip.model.encode_text(tokens, normalize=True), rtol=0, atol=1e-6)
    torch.testing.assert_close(embed.norm(dim=-1), torch.ones(3))
    assert torch.equal(mask, tokens != 0)
    assert encodings.shape == (3, 32, 64)
    assert torch.all(encodings[~mask] == 0)
    # The pooled token (end-of-text, the argmax id) projected is the embedding: the encodings
    # are the transformer outputs after ln_final, before pooling and projection.
    pooled = encodings[torch.arange(3), tokens.argmax(-1)] @ clip.model.text_projection
    torch.testing.assert_close(F.normalize(pooled, dim=-1), embed, rtol=0, atol=1e-6)
    # tokens in == strings in
    again = clip.encode_text(clip.tokenize(CAPTIONS))
    assert all(torch.equal(a, b) for a, b in zip(again, (embed, encodings, mask)))


def test_tokenize_truncates_to_context(clip):
    tokens = clip.tokenize(["word " * 100])
    assert tokens.shape == (1, 32) and tokens.dtype == torch.long
    with pytest.raises(TypeError):
        clip.tokenize("a single string")


def test_encode_image_normalises_and_resizes(clip):
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    mean = torch.tensor(clip.mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.std).view(1, 3, 1, 1)
    expected = clip.model.encode_image(((images + 1) / 2 - mean) / std, normalize=True)
    torch.testing.assert_close(clip.encode_image(images), expected, rtol=0, atol=1e-6)
    # Flat colours survive any resize exactly, so 80 px and 32 px versions encode alike.
    colours = torch.rand(2, 3, 1, 1, generator=gen) * 2 - 1
    small, big = colours.expand(2, 3, 32, 32), colours.expand(2, 3, 80, 80)
    torch.testing.assert_close(clip.encode_image(big), clip.encode_image(small), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="batch, 3, H, W"):
        clip.encode_image(images[:, :1])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_weights_file_round_trip(clip, tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    # weights unlike the (seeded) random init, so loading them visibly changes the model
    state = {k: (v + 0.05 if v.is_floating_point() else v).contiguous() for k, v in clip.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = load_clip_from_config(ClipConfig(name="unclip-tiny", pretrained=str(path)))
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert not torch.allclose(loaded.encode_text(CAPTIONS)[0], clip.encode_text(CAPTIONS)[0])


def test_random_init_is_the_same_in_every_process():
    # every rank of a precompute job must embed with the same frozen model
    torch.manual_seed(123)
    a = load_clip("unclip-tiny")
    before = torch.random.get_rng_state()
    b = load_clip("unclip-tiny")
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG did not move
    assert torch.equal(a.encode_text(CAPTIONS)[0], b.encode_text(CAPTIONS)[0])


def test_bad_name_and_pretrained_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="clip.name"):
        load_clip("ViT-Nope-99")
    with pytest.raises(ValueError, match="clip.pretrained"):
        load_clip("unclip-tiny", pretrained="no-such-tag")
    with pytest.raises(FileNotFoundError, match="clip.pretrained"):
        load_clip("unclip-tiny", pretrained=str(tmp_path / "missing.pt"))


def test_custom_text_tower_gives_same_conventions(tmp_path):
    cfg = architecture("unclip-tiny")
    cfg["custom_text"] = True
    path = tmp_path / "unclip-tiny-custom-text-test.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)  # open_clip's public registry, as users add their own
    torch.manual_seed(0)
    clip = load_clip("unclip-tiny-custom-text-test")
    embed, encodings, mask = clip.encode_text(CAPTIONS)
    tokens = clip.tokenize(CAPTIONS)
    torch.testing.assert_close(embed, clip.model.encode_text(tokens, normalize=True), rtol=0, atol=1e-6)
    assert encodings.shape == (3, 32, 64) and torch.all(encodings[~mask] == 0)
    assert clip.model.text.output_tokens is False  # restored after the call
