"""`unclip check` (data_pipeline/preflight.py, launch/check_cmd.py): every problem of a job's data
named before any rank starts: unreachable shards, too few shards for the ranks, embedding
shards missing, reordered, rewritten or of another CLIP, and CLIPs that disagree across configs."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import yaml

from data_pipeline.config import DataConfig, PrecomputeConfig, SourceConfig
from data_pipeline.precompute import run_precompute
from data_pipeline.preflight import ClipExpectation, check_data
from data_pipeline.shards import write_shards
from data_pipeline.stats import SkipCounter
from data_pipeline.tario import TarWriter, iter_tar
from launch.config_files import load_raw
from models.clip import ClipConfig, load_clip
from tests.helpers import explain, unclip, write_job

DECODER_WANTS = frozenset({"image", "image_embed", "text_encodings", "text_mask"})
TINY = ClipExpectation("unclip-tiny", None, 64, 64, 32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    shards = write_shards("shapes", str(root / "img"), per_shard=4, count=20, size=32).shards
    torch.manual_seed(0)
    cfg = PrecomputeConfig(clip=ClipConfig(name="unclip-tiny"), batch_size=8, num_workers=0, text_encodings=True)
    run_precompute(cfg, shards=shards, out=str(root / "emb"), clip=load_clip("unclip-tiny"), progress=False)
    return root, shards


def data(shards, emb, **kw):
    return DataConfig(sources=[SourceConfig(shards=shards, embeddings=str(emb))], image_size=16, **kw)


def test_a_sound_dataset_passes_and_is_counted(dataset):
    root, shards = dataset
    report = check_data(data(shards, root / "emb", num_workers=1, resampled=False), want=DECODER_WANTS, world_size=2,
                        expect=TINY)
    assert report.problems == []
    assert "data.sources[0].shards: 5 shard(s), 20 samples in 5 counted shard(s)" in report.notes
    assert any("5 embedding shard(s) aligned with the image shards, 20 samples, CLIP unclip-tiny (D=64, W=64, L=32)"
               in n for n in report.notes)


def test_every_misaligned_embedding_shard_is_named(dataset, tmp_path):
    root, shards = dataset
    emb = tmp_path / "emb"
    shutil.copytree(root / "emb", emb)
    img = tmp_path / "img"
    shutil.copytree(root / "img", img)
    shards = [str(img / os.path.basename(s)) for s in shards]
    os.remove(emb / "shard-000001.tar")  # missing
    for ext in ("", ".json", ".stats.npy"):  # reordered: 2 and 3 swapped, records and all
        os.rename(emb / f"shard-000002.tar{ext}", tmp_path / "swap")
        os.rename(emb / f"shard-000003.tar{ext}", emb / f"shard-000002.tar{ext}")
        os.rename(tmp_path / "swap", emb / f"shard-000003.tar{ext}")
    shutil.copy(emb / "shard-000000.tar", emb / "shard-000099.tar")  # extra
    samples = list(iter_tar(shards[4], SkipCounter()))
    with TarWriter(shards[4]) as w:  # the image shard rewritten since precompute
        for s in samples[1:]:
            w.write(s.key, s.fields)
    report = check_data(data(shards, emb, num_workers=2, resampled=False), want=DECODER_WANTS, world_size=3,
                        expect=TINY)
    text = "\n".join(report.problems)
    assert "no embedding shard for 1 of 5 image shard(s): shard-000001.tar" in text
    assert "2 embedding shard(s) not what precompute wrote there: swapped, reordered or rewritten since: " \
           "shard-000002.tar (first key 'shapes_0_00000012', recorded 'shapes_0_00000008'), shard-000003.tar " \
           "(first key 'shapes_0_00000008', recorded 'shapes_0_00000012')" in text
    assert "1 embedding shard(s) image shard changed since its embeddings were computed: shard-000004.tar (first key " \
           "'shapes_0_00000017', 'shapes_0_00000016' then)" in text
    assert "5 shard(s) cannot be split across 3 rank(s) x 2 worker(s) in epoch mode" in text
    assert len(report.problems) == 4, text
    assert any("have no image shard in this source and are not read: shard-000099.tar" in n for n in report.notes)


def test_a_clip_other_than_the_stage_expects_is_refused(dataset):
    root, shards = dataset
    paper = ClipExpectation("ViT-H-14", None, 1024, 1024, 77, where={"embed_dim": "model.image_embed_dim"})
    report = check_data(data(shards, root / "emb"), want=DECODER_WANTS, world_size=1, expect=paper)
    where = f"{root / 'emb'}/embeddings.json"
    assert report.problems == [
        f"data.sources[0].embeddings: {where} is CLIP unclip-tiny, but clip.name is ViT-H-14",
        f"data.sources[0].embeddings: {where} has embedding width 64 (unclip-tiny), but model.image_embed_dim is 1024",
        f"data.sources[0].embeddings: {where} has text width 64 (unclip-tiny), but model.text_width is 1024"]


def test_unreachable_shards_and_missing_embeddings_are_named(tmp_path):
    report = check_data(data([str(tmp_path / "gone-000000.tar")], tmp_path / "nothing"), want=DECODER_WANTS,
                        world_size=1)
    assert report.problems == [f"data.sources[0].shards: 1 of 1 shard(s) not found: {tmp_path / 'gone-000000.tar'}",
                               f"data.sources[0].embeddings: no embeddings.json in {tmp_path / 'nothing'} "
                               "(run `unclip precompute` into it)"]


def _resolved(path: str, **sections) -> dict:
    job = load_raw(path)
    job.pop("base", None)
    for key, value in sections.items():
        job[key] = value
    return job


def test_check_names_a_precompute_clip_the_stages_do_not_expect(tmp_path):
    """The paper's jobs with the precompute on ViT-L-14 (768-d) and the prior and decoder at
    1024-d: named, exit 2; with one CLIP throughout, nothing to name."""
    from launch.check_cmd import check_configs
    from launch.config_files import build_job

    def jobs(precompute_clip):
        pre = _resolved("configs/paper/precompute.yaml", clip={"name": precompute_clip})
        return [("pre.yaml", build_job(pre))] + [
            (f"{stage}.yaml", build_job(_resolved(f"configs/paper/{stage}.yaml", clip={"name": "ViT-H-14"})))
            for stage in ("prior", "decoder")]

    assert check_configs(jobs("ViT-H-14")).problems == []
    problems = check_configs(jobs("ViT-L-14")).problems
    assert "prior.yaml: pre.yaml (what precompute embeds with) has embedding width 768 (ViT-L-14), but " \
           "model.embed_dim is 1024" in problems
    assert "decoder.yaml: pre.yaml (what precompute embeds with) has embedding width 768 (ViT-L-14), but " \
           "model.image_embed_dim is 1024" in problems
    assert "decoder.yaml: pre.yaml (what precompute embeds with) has text width 768 (ViT-L-14), but " \
           "model.text_width is 1024" in problems
    # the command says so too, and exits 2
    files = []
    for name, stage in (("precompute", "precompute"), ("prior", "prior")):
        raw = _resolved(f"configs/paper/{stage}.yaml", clip={"name": "ViT-L-14" if stage == "precompute" else "ViT-H-14"})
        files += ["--config", str(write_job(tmp_path / f"{name}.yaml", raw))]
    done = unclip("check", *files, "--no-data", timeout=120)
    assert done.returncode == 2, explain(done)
    assert "has embedding width 768 (ViT-L-14), but model.embed_dim is 1024" in done.stdout


def test_train_refuses_bad_data_before_any_rank_starts(dataset, tmp_path):
    root, shards = dataset
    emb = tmp_path / "emb"
    shutil.copytree(root / "emb", emb)
    os.remove(emb / "shard-000003.tar")
    job = {"stage": "prior", "name": "p", "clip": {"name": "unclip-tiny"},
           "model": {"embed_dim": 64, "text_width": 64, "max_text_len": 32, "dim": 32, "depth": 1, "heads": 2,
                     "dim_head": 16},
           "data": {"sources": [{"shards": shards, "embeddings": str(emb)}], "num_workers": 0}}
    done = unclip("train", "--config", str(write_job(tmp_path / "p.yaml", job)), "--run-dir", str(tmp_path / "run"),
                  timeout=120)
    assert done.returncode == 2, explain(done)
    assert "preflight (`unclip check`) found problems" in done.stderr and "shard-000003.tar" in done.stderr
    assert not (tmp_path / "run").exists()  # nothing started, nothing written
    assert yaml.safe_load((emb / "embeddings.json").read_text())["embed_dim"] == 64


def test_a_prior_asking_for_the_embedding_statistics_is_scaled_by_them(dataset, tmp_path):
    from data_pipeline.embed_stats import read_stats
    from launch.train_cmd import load_train_job
    from models.config import ConfigError

    root, shards = dataset
    job = {"stage": "prior", "name": "p", "clip": {"name": "unclip-tiny"},
           "model": {"embed_dim": 64, "text_width": 64, "max_text_len": 32, "image_embed_scale": "stats"},
           "data": {"sources": [{"shards": shards, "embeddings": str(root / "emb")}]}}
    resolved = load_train_job(str(write_job(tmp_path / "p.yaml", job)), [])
    std = read_stats(str(root / "emb"))["image_embed"]["std"]
    assert resolved.model.image_embed_scale == pytest.approx(64 / sum(std))
    from models.prior import DiffusionPrior

    assert DiffusionPrior(resolved.model).embedding_space.scale == pytest.approx(64 / sum(std))
    emb = tmp_path / "emb"
    shutil.copytree(root / "emb", emb)
    os.remove(emb / "stats.json")
    job["data"]["sources"][0]["embeddings"] = str(emb)
    with pytest.raises(ConfigError, match="no stats.json"):
        load_train_job(str(write_job(tmp_path / "p.yaml", job)), [])
    from launch.check_cmd import preflight_job
    from launch.config_files import load_config

    report = preflight_job("p.yaml", load_config(tmp_path / "p.yaml"), world_size=1)
    assert any("normalises by the embedding statistics, but" in p and "has no stats.json" in p for p in report.problems)
