"""trainer/validation.py and the stages' validation measures, in one process (no DeepSpeed):
the held-out loss equals the loss computed directly on the same batch with the same draws,
the split over ranks changes nothing, and the sampled metrics are what their names say."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from launch.config_files import build_job
from models import stages
from models.config import ConfigError
from models.stages import StageContext
from models.stages.decoder import clip_scores
from models.stages.prior import embedding_cosines
from tests.helpers import TINY_DECODER, TINY_PRIOR, merged
from trainer.engine import StageModule
from trainer.synthetic import SyntheticLoader
from trainer.validation import LOSS, Validator, assignments, read_held_out


def _validated(base: dict, **validation) -> tuple:
    job = build_job(merged(base, validation={"every_steps": 5, "batches": 3, "sample_steps": 4, **validation}))
    spec = stages.get(job.stage)
    torch.manual_seed(0)
    module = StageModule(spec, spec.build(job), StageContext()).eval()
    return job, spec, module


@pytest.mark.parametrize("count", range(0, 8))
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_held_out_batch_counts_once_and_every_rank_runs_as_many_forwards(count, world):
    work = [assignments(count, rank, world) for rank in range(world)]
    assert len({len(w) for w in work}) == 1  # ZeRO-3: the same forwards on every rank
    counted = sorted(i for w in work for i, c in w if c)
    assert counted == list(range(count))
    assert all(0 <= i < count for w in work for i, _ in w)


def test_validation_loss_is_the_loss_of_the_fixed_held_out_batches():
    job, spec, module = _validated(TINY_PRIOR, sample_batches=0)
    validator = Validator(job, spec, 0, 1, "cpu")
    assert validator.names == [LOSS] and sorted(validator.batches) == [0, 1, 2]
    values = validator.run(module)
    # the same number by hand: the stage's loss of each batch in eval mode, the batch's own draws
    with torch.no_grad():
        direct = [spec.loss(module.model, validator.batches[i], validator.generator(i), StageContext()) for i in range(3)]
    assert values[LOSS] == pytest.approx(float(sum(direct)) / 3, rel=1e-6)
    assert validator.run(module) == values  # fixed timesteps and noise: nothing else moves it
    # held out: not what any training rank draws
    training = next(SyntheticLoader({k: v.shape[1:] for k, v in validator.batches[0].items() if torch.is_tensor(v)},
                                    batch_size=job.train.micro_batch_size, rank=0, seed=job.train.seed))
    assert not torch.equal(training["text_embed"], validator.batches[0]["text_embed"])
    with torch.no_grad():
        module.model.to_out.bias.add_(0.1)
    assert validator.run(module)[LOSS] != values[LOSS]
    assert [s for s in range(1, 41) if validator.due(s)] == [5, 10, 15, 20, 25, 30, 35, 40]


def test_sharing_the_work_over_ranks_gives_the_same_figure():
    job, spec, module = _validated(TINY_PRIOR, batches=4, sample_batches=2)
    whole = Validator(job, spec, 0, 1, "cpu").run(module)
    # without a process group each rank returns its own means; 2 ranks hold equal shares
    halves = [Validator(job, spec, rank, 2, "cpu").run(module) for rank in (0, 1)]
    for name, value in whole.items():
        assert (halves[0][name] + halves[1][name]) / 2 == pytest.approx(value, rel=1e-6), name


def test_prior_cosines_come_from_samples_of_the_priors_sampler():
    job, spec, module = _validated(TINY_PRIOR, sample_batches=1)
    validator = Validator(job, spec, 0, 1, "cpu")
    values = validator.run(module)
    names = {name for name, _ in spec.validation.metrics}
    assert set(values) == {LOSS} | names
    batch = validator.batches[0]
    sampled = module.model.sample(
        batch["text_embed"], batch["text_encodings"], batch["text_mask"].bool(), steps=4, candidates=1,
        generator=validator.generator(0, 1),
    )
    expected = embedding_cosines(sampled, batch["image_embed"], batch["text_embed"])
    for name in names:
        assert values[name] == pytest.approx(float(expected[name].mean()), rel=1e-5), name


def test_embedding_cosines_are_what_their_names_say():
    text = F.normalize(torch.randn(4, 8), dim=-1)
    image = F.normalize(torch.randn(4, 8), dim=-1)
    got = embedding_cosines(image.clone(), image, text)  # a prior that samples the true embedding
    assert torch.allclose(got["prior_image_cosine"], torch.ones(4))
    assert torch.allclose(got["prior_text_cosine"], got["prior_reference_text_cosine"])
    assert torch.allclose(got["prior_unrelated_text_cosine"], (image * text[[3, 0, 1, 2]]).sum(-1))
    assert "prior_unrelated_text_cosine" not in embedding_cosines(image[:1], image[:1], text[:1])


def test_clip_score_is_the_clamped_cosine_with_the_caption():
    text = F.normalize(torch.randn(3, 8), dim=-1)
    image_embed = F.normalize(torch.randn(3, 8), dim=-1)
    got = clip_scores(torch.stack([text[0], -text[1], image_embed[2]]) * 3, text * 2, image_embed, text)
    assert got["decoder_clip_score"][:2].tolist() == pytest.approx([1.0, 0.0])  # max(cos, 0)
    assert got["decoder_reference_clip_score"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert float(got["decoder_image_cosine"][2]) == pytest.approx(1.0)


def test_decoder_scores_its_samples_with_the_jobs_frozen_clip():
    base = merged(TINY_DECODER, model={**TINY_DECODER["model"], "image_embed_dim": 64}, clip={"name": "unclip-tiny"})
    job, spec, module = _validated(base, batches=2, sample_batches=1)
    validator = Validator(job, spec, 0, 1, "cpu")
    values = validator.run(module)
    assert {"decoder_clip_score", "decoder_reference_clip_score", "decoder_image_cosine"} <= set(values)
    from models.clip import load_clip

    clip = load_clip("unclip-tiny")  # the same seeded weights as the precompute's
    batch = validator.batches[0]
    real = clip.encode_image(batch["image"])
    expected = (real * F.normalize(batch["text_embed"], dim=-1)).sum(-1).clamp(min=0).mean()
    assert values["decoder_reference_clip_score"] == pytest.approx(float(expected), rel=1e-5)
    # off by default: the decoder loads no CLIP unless asked
    job, spec, _ = _validated(base, batches=2)
    assert Validator(job, spec, 0, 1, "cpu").names == [LOSS]


def test_too_few_held_out_batches_is_a_config_error():
    stream = iter([{"x": torch.zeros(2)}] * 2)
    with pytest.raises(ConfigError, match="holds 2 full batch.*validation.batches asks for 3"):
        read_held_out(stream, 3, {0, 1, 2}, batch_size=2)


def test_validation_needs_held_out_data_when_the_job_has_data():
    with pytest.raises(ConfigError, match="set data.validation"):
        build_job({"stage": "prior", "validation": {"every_steps": 10}, "data": {"sources": [{"shards": "a.tar"}]}})
    job = build_job({"stage": "prior", "validation": {"every_steps": 10},
                     "data": {"sources": [{"shards": "a.tar"}], "validation": [{"shards": "b.tar"}]}})
    assert job.data.validation[0].shards == "b.tar"
    single = job.data.single_pass(job.data.validation)
    assert single.sources == job.data.validation and not single.resampled and single.num_workers == 0


def test_held_out_sources_without_the_stages_embeddings_are_named(tmp_path):
    from data_pipeline.shards import write_shards
    from trainer.validation import held_out_stream

    write_shards("shapes", str(tmp_path), per_shard=4, count=4, size=8, seed=0)
    job = build_job(merged(TINY_PRIOR, data={"sources": [{"shards": f"{tmp_path}/shard-000000.tar"}],
                                             "validation": [{"shards": f"{tmp_path}/shard-000000.tar"}]}))
    with pytest.raises(ConfigError, match=r"data.validation\[0\].embeddings: this stage needs"):
        held_out_stream(job, stages.get("prior"), {})
