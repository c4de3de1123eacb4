"""Object stores for real: every command that takes URLs, against a real S3 API server (moto's,
on 127.0.0.1), reached as users reach MinIO or Ceph. Shards, embeddings and exported weights
live in the bucket; checkpoints stay on the local filesystem.

The chain is built once per module (shards -> precompute -> training -> export -> sampling),
each step a fixture that the test of that step checks; what S3 holds is compared with what the
same step writes to a local folder, byte for byte (exported weights: tensor for tensor).
Training runs as users run it (2 ranks, own processes); the other commands run in this process
through the command line's `main`, which is all a subprocess would run, without its start-up.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from launch.cli import main
from tests.helpers import TINY_DECODER, explain, latest_step, losses, merged, unclip, write_job
from tests.infra.s3 import SECRET, free_port

ROOT = Path(__file__).resolve().parent.parent
PRECOMPUTE = ROOT / "configs" / "demo" / "precompute.yaml"
BUCKET = "unclip-test"
SHARDS = [f"shard-{i:06d}.tar" for i in range(4)]
SHARD_ARGS = ["--source", "shapes", "--count", "48", "--per-shard", "12", "--size", "16", "--seed", "3"]
PRECOMPUTE_SETS = ["batch_size=16", "num_workers=1"]
STEPS = 4
SAMPLE_ARGS = ["--prompt", "a large red circle", "-n", "2", "--steps", "2", "--seed", "5"]

pytestmark = pytest.mark.slow


def run(*argv: str, env: dict[str, str]) -> tuple[int, str]:
    """`unclip ARGV` in this process with exactly `env`'s AWS settings; (exit code, stdout +
    stderr), the secret of the credentials in neither."""
    import s3fs

    from data_pipeline import io as dio

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("AWS_ENDPOINT_URL", raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        mp.setattr(dio, "_STORAGE_OPTIONS", {})  # a command's storage options end with it
        s3fs.S3FileSystem.clear_instance_cache()  # a client reads the environment when made
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            code = main(list(argv))
    s3fs.S3FileSystem.clear_instance_cache()
    assert SECRET not in printed.getvalue()
    return code, printed.getvalue()


def succeeded(*argv: str, env: dict[str, str]) -> str:
    code, printed = run(*argv, env=env)
    assert code == 0, printed
    return printed


def pattern(folder: str) -> str:
    return f"{folder}/shard-{{000000..000003}}.tar"


@pytest.fixture(scope="module")
def bucket(s3_server):
    s3_server.fs().mkdir(BUCKET)
    return f"s3://{BUCKET}"


@pytest.fixture(scope="module")
def s3_shards(s3_server, bucket):
    """`unclip shards --out s3://...`, the endpoint from AWS_ENDPOINT_URL."""
    succeeded("shards", *SHARD_ARGS, "--out", f"{bucket}/shapes", env=s3_server.env)
    return f"{bucket}/shapes"


@pytest.fixture(scope="module")
def s3_embeddings(s3_server, s3_shards):
    """`unclip precompute` from s3:// to s3://, the endpoint from the config's storage_options
    (AWS_ENDPOINT_URL unset): the per-location setting works on its own."""
    out = s3_shards.rsplit("/", 1)[0] + "/embeddings"
    sets = [*PRECOMPUTE_SETS, f"storage_options={{endpoint_url: '{s3_server.endpoint}'}}"]
    succeeded("precompute", "--config", str(PRECOMPUTE), "--shards", pattern(s3_shards), "--out", out,
              *[a for s in sets for a in ("--set", s)], env=s3_server.credentials)
    return out


@pytest.fixture(scope="module")
def s3_run(s3_server, s3_shards, s3_embeddings, tmp_path_factory):
    """A 2-rank decoder job streaming image shards joined with embedding shards from S3."""
    root = tmp_path_factory.mktemp("s3-train")
    job = merged(
        TINY_DECODER,
        model={**TINY_DECODER["model"], "image_embed_dim": 64, "text_width": 64, "max_text_len": 16},
        data={"sources": [{"shards": pattern(s3_shards), "embeddings": s3_embeddings,
                           "storage_options": {"endpoint_url": s3_server.endpoint}}],
              "image_size": 8, "num_workers": 1, "shuffle_buffer": 16},
        clip={"name": "unclip-demo"},
        train={**TINY_DECODER["train"], "steps": STEPS},
        checkpoint={"every_steps": STEPS, "keep_last": 1},
        # wider than the other tests' 60 s: on shared cores one rank's start can lag the other's
        deepspeed={**TINY_DECODER["deepspeed"], "timeout_s": 300},
    )
    run_dir = root / "run"
    config = write_job(root / "decoder.yaml", job)
    done = unclip("train", "--config", str(config), "--run-dir", str(run_dir), "--nproc", "2",
                  env=s3_server.credentials, timeout=600)
    assert done.returncode == 0, explain(done)
    assert SECRET not in done.stdout + done.stderr
    return run_dir


@pytest.fixture(scope="module")
def exports(s3_server, s3_run, tmp_path_factory) -> dict[str, str]:
    """The decoder exported by `unclip export --out s3://...` and to a local file; a CLIP stage
    (the demo architecture, random weights) written to both by `write_export` itself."""
    import torch

    from models.clip import build_open_clip
    from models.weights import StageWeights, write_export

    local = tmp_path_factory.mktemp("exports")
    url = f"s3://{BUCKET}/weights"
    succeeded("export", str(s3_run), "--out", f"{url}/decoder.safetensors", env=s3_server.env)
    succeeded("export", str(s3_run), "--out", str(local / "decoder.safetensors"), env={})
    torch.manual_seed(0)
    clip = StageWeights("clip", 0, {"stage": "clip", "model": {"name": "unclip-demo"}},
                        build_open_clip("unclip-demo").state_dict(), "random")
    write_export(clip, local / "clip.safetensors")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env.items():
            mp.setenv(key, value)
        write_export(clip, f"{url}/clip.safetensors")
    return {"s3": url, "local": str(local)}


def test_shards_written_to_s3_are_the_local_bytes(s3_server, s3_shards, tmp_path):
    from data_pipeline.shards import write_shards

    write_shards("shapes", str(tmp_path), count=48, per_shard=12, size=16, seed=3)
    fs = s3_server.fs()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(s3_shards.removeprefix("s3://")))
    assert names == [*SHARDS, "sizes.json"]  # no temporaries left behind
    for name in names:
        assert fs.cat(f"{s3_shards}/{name}") == (tmp_path / name).read_bytes(), name


def test_precompute_reads_and_writes_s3_as_it_does_local_files(s3_server, s3_embeddings, tmp_path):
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
    assert sorted(losses(s3_run)) == list(range(1, STEPS + 1))
    assert latest_step(s3_run) == STEPS  # checkpoints on the local filesystem
    for rank in (0, 1):  # every sample read whole and joined with its embeddings: nothing skipped
        state = json.loads((s3_run / "checkpoints" / f"step_{STEPS:07d}" / f"rank_{rank:05d}.json").read_text())
        assert state["loader"]["skipped"] == {}, state["loader"]
        assert state["loader"]["slots"], state["loader"]


def safetensors_content(data: bytes) -> tuple[dict, dict]:
    """(metadata, tensors) of a safetensors file: its bytes vary with the writer process's
    hash seed (the metadata is a Rust HashMap), its content does not."""
    import struct

    from safetensors.torch import load

    header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    return header["__metadata__"], load(data)


def test_exported_weights_written_to_s3_hold_what_a_local_export_holds(s3_server, exports):
    import torch

    fs = s3_server.fs()
    assert sorted(fs.ls(f"{BUCKET}/weights")) == [f"{BUCKET}/weights/{n}.safetensors" for n in ("clip", "decoder")]
    for name in ("clip", "decoder"):  # no temporaries left; the same file as a local export
        s3_meta, s3_weights = safetensors_content(fs.cat(f"{exports['s3']}/{name}.safetensors"))
        meta, weights = safetensors_content(Path(exports["local"], f"{name}.safetensors").read_bytes())
        assert s3_meta == meta and s3_meta["stage"] == name
        assert s3_weights.keys() == weights.keys()
        assert all(torch.equal(s3_weights[k], weights[k]) for k in weights)


def test_sampling_from_exports_in_s3_draws_what_local_exports_draw(s3_server, exports, tmp_path):
    drawn = {}
    for where, env in (("s3", s3_server.env), ("local", {})):
        weights = [f"{exports[where]}/{name}.safetensors" for name in ("clip", "decoder")]
        printed = succeeded("sample", "--weights", *weights, *SAMPLE_ARGS, "--out", str(tmp_path / where), env=env)
        pngs = sorted((tmp_path / where).glob("*.png"))
        assert [str(p) for p in pngs] == printed.split(), printed
        drawn[where] = [p.read_bytes() for p in pngs]
    assert len(drawn["s3"]) == 2 and drawn["s3"] == drawn["local"]


def test_weights_missing_from_s3_are_one_line_and_exit_2(s3_server, exports, tmp_path):
    missing = f"{exports['s3']}/prior.safetensors"
    code, printed = run("sample", "--weights", f"{exports['s3']}/clip.safetensors", missing, *SAMPLE_ARGS,
                        "--out", str(tmp_path), env=s3_server.env)
    assert (code, printed.strip().splitlines()) == (2, [f"unclip sample: cannot read {missing}: no such file"])


@pytest.mark.parametrize("command", ["shards", "export"])
def test_a_missing_bucket_is_refused_before_any_work_not_created(s3_server, command, tmp_path):
    out = "s3://unclip-typo/out"
    argv = {"shards": ["shards", *SHARD_ARGS, "--out", out],
            "export": ["export", str(tmp_path / "no-run-read"), "--out", f"{out}/prior.safetensors"]}[command]
    code, printed = run(*argv, env=s3_server.env)
    refused = (f"unclip {command}: s3://unclip-typo/out: bucket unclip-typo does not exist; create it first "
               "(unclip never creates buckets: a mistyped name would become a new one)")
    assert (code, printed.strip().splitlines()) == (2, [refused])
    assert not s3_server.fs().exists("unclip-typo")


@pytest.mark.parametrize("command", ["shards", "sample"])
def test_an_unreachable_endpoint_is_one_line_and_exit_1(s3_server, command, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    env = {**s3_server.credentials, "AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "1"}
    url = f"s3://{BUCKET}/nowhere"
    argv, failed = {
        "shards": (["shards", *SHARD_ARGS, "--out", url],
                   (f"cannot write {url}: find the bucket of {url}: EndpointConnectionError: "
                    f'Could not connect to the endpoint URL: "{endpoint}/{BUCKET}"')),
        "sample": (["sample", "--weights", f"{url}/clip.safetensors", *SAMPLE_ARGS, "--out", str(tmp_path)],
                   (f"cannot read {url}/clip.safetensors: EndpointConnectionError: "
                    f'Could not connect to the endpoint URL: "{endpoint}/{BUCKET}/nowhere/clip.safetensors"')),
    }[command]
    code, printed = run(*argv, env=env)
    assert (code, printed.strip().splitlines()) == (1, [f"unclip {command}: {failed}"])
