"""Object stores for real: every command that takes URLs, against a real S3 API server (moto's,
on 127.0.0.1), reached as users reach MinIO or Ceph. Shards, embeddings and exported weights
live in the bucket; checkpoints stay on the local filesystem.

The chain is built once per module (shards -> precompute -> training -> export), each step a
fixture that the test of that step checks; what S3 holds is compared with what the same step
writes to a local folder, byte for byte (exported weights: tensor for tensor).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.s3_server import SECRET, s3_server  # noqa: F401  (the session's server fixture)
from tests.helpers import TINY_DECODER, explain, latest_step, losses, merged, unclip, write_job

ROOT = Path(__file__).resolve().parent.parent
PRECOMPUTE = ROOT / "configs" / "demo" / "precompute.yaml"
BUCKET = "unclip-test"
SHARDS = [f"shard-{i:06d}.tar" for i in range(4)]
SHARD_ARGS = ["--source", "shapes", "--count", "48", "--per-shard", "12", "--size", "16", "--seed", "3"]
PRECOMPUTE_SETS = ["batch_size=16", "num_workers=1"]

pytestmark = pytest.mark.slow


def succeeded(done) -> None:
    """Exit 0, and the secret of the credentials in no output."""
    assert done.returncode == 0, explain(done)
    assert SECRET not in done.stdout + done.stderr


def pattern(folder: str) -> str:
    return f"{folder}/shard-{{000000..000003}}.tar"


@pytest.fixture(scope="module")
def bucket(s3_server):  # noqa: F811
    s3_server.fs().mkdir(BUCKET)
    return f"s3://{BUCKET}"


@pytest.fixture(scope="module")
def s3_shards(s3_server, bucket):  # noqa: F811
    """`unclip shards --out s3://...`, the endpoint from AWS_ENDPOINT_URL."""
    done = unclip("shards", *SHARD_ARGS, "--out", f"{bucket}/shapes", env=s3_server.env, timeout=180)
    succeeded(done)
    return f"{bucket}/shapes"


@pytest.fixture(scope="module")
def s3_embeddings(s3_server, s3_shards):  # noqa: F811
    """`unclip precompute` from s3:// to s3://, the endpoint from the config's storage_options
    (AWS_ENDPOINT_URL unset): the per-location setting works on its own."""
    out = s3_shards.rsplit("/", 1)[0] + "/embeddings"
    sets = [*PRECOMPUTE_SETS, f"storage_options={{endpoint_url: '{s3_server.endpoint}'}}"]
    done = unclip("precompute", "--config", str(PRECOMPUTE), "--shards", pattern(s3_shards), "--out", out,
                  *[a for s in sets for a in ("--set", s)], env=s3_server.credentials, timeout=300)
    succeeded(done)
    return out


@pytest.fixture(scope="module")
def s3_run(s3_server, s3_shards, s3_embeddings, tmp_path_factory):  # noqa: F811
    """A 2-rank decoder job streaming image shards joined with embedding shards from S3."""
    root = tmp_path_factory.mktemp("s3-train")
    job = merged(
        TINY_DECODER,
        model={**TINY_DECODER["model"], "image_embed_dim": 64, "text_width": 64, "max_text_len": 16},
        data={"sources": [{"shards": pattern(s3_shards), "embeddings": s3_embeddings,
                           "storage_options": {"endpoint_url": s3_server.endpoint}}],
              "image_size": 8, "num_workers": 1, "shuffle_buffer": 16},
        clip={"name": "unclip-demo"},
        # wider than the other tests' 60 s: on shared cores one rank's start can lag the other's
        deepspeed={**TINY_DECODER["deepspeed"], "timeout_s": 300},
    )
    run_dir = root / "run"
    config = write_job(root / "decoder.yaml", job)
    done = unclip("train", "--config", str(config), "--run-dir", str(run_dir), "--nproc", "2",
                  env=s3_server.credentials, timeout=600)
    return done, run_dir


def test_shards_written_to_s3_are_the_local_bytes(s3_server, s3_shards, tmp_path):  # noqa: F811
    from data_pipeline.shards import write_shards

    write_shards("shapes", str(tmp_path), count=48, per_shard=12, size=16, seed=3)
    fs = s3_server.fs()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(s3_shards.removeprefix("s3://")))
    assert names == [*SHARDS, "sizes.json"]  # no temporaries left behind
    for name in names:
        assert fs.cat(f"{s3_shards}/{name}") == (tmp_path / name).read_bytes(), name


def test_precompute_reads_and_writes_s3_as_it_does_local_files(s3_server, s3_embeddings, tmp_path):  # noqa: F811
    from data_pipeline.precompute import run_precompute
    from data_pipeline.shards import write_shards
    from launch.config_files import load_config

    write_shards("shapes", str(tmp_path / "shards"), count=48, per_shard=12, size=16, seed=3)
    run_precompute(load_config(PRECOMPUTE, PRECOMPUTE_SETS), shards=pattern(str(tmp_path / "shards")),
                   out=str(tmp_path / "emb"), progress=False)
    fs = s3_server.fs()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(s3_embeddings.removeprefix("s3://")))
    assert names == sorted(p.name for p in (tmp_path / "emb").iterdir())
    assert {*SHARDS, "_SUCCESS", "embeddings.json", "sizes.json"} <= set(names)
    for name in names:
        assert fs.cat(f"{s3_embeddings}/{name}") == (tmp_path / "emb" / name).read_bytes(), name


def test_training_streams_shards_and_embeddings_from_s3(s3_run):
    done, run_dir = s3_run
    succeeded(done)
    steps = TINY_DECODER["train"]["steps"]
    assert sorted(losses(run_dir)) == list(range(1, steps + 1))
    assert latest_step(run_dir) == steps  # checkpoints on the local filesystem
    for rank in (0, 1):  # every sample read whole and joined with its embeddings: nothing skipped
        state = json.loads((run_dir / "checkpoints" / f"step_{steps:07d}" / f"rank_{rank:05d}.json").read_text())
        assert state["loader"]["skipped"] == {}, state["loader"]
        assert state["loader"]["slots"], state["loader"]


def safetensors_content(data: bytes) -> tuple[dict, dict]:
    """(metadata, tensors) of a safetensors file: its bytes vary with the writer process's
    hash seed (the metadata is a Rust HashMap), its content does not."""
    import struct

    from safetensors.torch import load

    header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    return header["__metadata__"], load(data)


def test_exported_weights_written_to_s3_hold_what_a_local_export_holds(s3_server, s3_run, tmp_path):  # noqa: F811
    import torch

    from trainer.export import export

    done, run_dir = s3_run
    succeeded(done)
    url = f"s3://{BUCKET}/weights/decoder.safetensors"
    succeeded(unclip("export", str(run_dir), "--out", url, env=s3_server.env, timeout=180))
    export(run_dir, tmp_path / "decoder.safetensors")
    fs = s3_server.fs()
    assert fs.ls(f"{BUCKET}/weights") == [f"{BUCKET}/weights/decoder.safetensors"]  # no temporary left
    s3_meta, s3_weights = safetensors_content(fs.cat(url))
    meta, weights = safetensors_content((tmp_path / "decoder.safetensors").read_bytes())
    assert s3_meta == meta and s3_meta["stage"] == "decoder"
    assert s3_weights.keys() == weights.keys()
    assert all(torch.equal(s3_weights[k], weights[k]) for k in weights)


def test_an_unreachable_endpoint_is_one_line_and_exit_1_without_secrets(s3_server):  # noqa: F811
    from tests.s3_server import _free_port

    env = {**s3_server.credentials, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}", "AWS_MAX_ATTEMPTS": "1"}
    done = unclip("shards", *SHARD_ARGS, "--out", f"s3://{BUCKET}/nowhere", env=env, timeout=180)
    assert done.returncode == 1, explain(done)
    assert done.stderr.strip().splitlines() == [
        f"unclip shards: cannot write s3://{BUCKET}/nowhere: mkdir s3://{BUCKET}/nowhere: EndpointConnectionError: "
        f'Could not connect to the endpoint URL: "{env["AWS_ENDPOINT_URL"]}/{BUCKET}"'], done.stderr
    assert SECRET not in done.stdout + done.stderr
