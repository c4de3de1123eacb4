"""URLs checked at each command's start (a missing backend is one line and exit 2, before any
work), run directories that are URLs refused, storage options without credentials, and the
per-location storage options and error types of data_pipeline.io."""

from __future__ import annotations

import fsspec
import pytest

from data_pipeline import io as dio
from launch.cli import main
from models.config import ConfigError, build_config
from tests.helpers import TINY_DECODER, merged, write_job

# Azure's fsspec backend (adlfs) is no dependency of ours: az:// stands for any URL whose
# backend is not installed, as s3:// was before s3fs became one.
MISSING = "az://container/data"


@pytest.fixture(autouse=True)
def _no_adlfs():
    if dio.backend_problem(MISSING) is None:
        pytest.fail("adlfs is installed here; these tests need a scheme whose backend is absent")


def decoder_job(tmp_path, shards: str, embeddings: str = "unused"):
    job = merged(TINY_DECODER, data={"sources": [{"shards": shards, "embeddings": embeddings}]})
    return str(write_job(tmp_path / "decoder.yaml", job))


def commands(tmp_path) -> dict[str, list[str]]:
    precompute = ["precompute", "--config", "configs/demo/precompute.yaml"]
    return {
        "shards --out": ["shards", "--source", "shapes", "--out", f"{MISSING}/shards"],
        "shards --source table": ["shards", "--source", f"table:{MISSING}/pairs.parquet", "--out", str(tmp_path / "o")],
        "precompute --shards": [*precompute, "--shards", f"{MISSING}/s-{{0..3}}.tar", "--out", str(tmp_path / "o")],
        "precompute --out": [*precompute, "--shards", str(tmp_path / "s.tar"), "--out", f"{MISSING}/emb"],
        "train data.sources": ["train", "--config", decoder_job(tmp_path, f"{MISSING}/s.tar"), "--run-dir", str(tmp_path / "o")],
        "train embeddings": ["train", "--config", decoder_job(tmp_path, str(tmp_path / "s.tar"), f"{MISSING}/emb"),
                             "--run-dir", str(tmp_path / "o")],
        "launch data.sources": ["launch", "--config", decoder_job(tmp_path, f"{MISSING}/s.tar"), "--nproc", "1",
                                "--run-dir", str(tmp_path / "o")],
        "export --out": ["export", str(tmp_path / "o"), "--out", f"{MISSING}/w.safetensors"],
        "sample --weights": ["sample", "--weights", str(tmp_path / "clip.safetensors"), f"{MISSING}/w.safetensors",
                             "--prompt", "a red circle", "--out", str(tmp_path / "o")],
    }


@pytest.mark.parametrize("command", ["shards --out", "shards --source table", "precompute --shards",
                                     "precompute --out", "train data.sources", "train embeddings",
                                     "launch data.sources", "export --out", "sample --weights"])
def test_a_url_without_its_backend_is_one_line_and_exit_2_before_any_work(command, tmp_path, capsys):
    argv = commands(tmp_path)[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert MISSING in err and "pip install adlfs" in err, err
    assert not (tmp_path / "o").exists()  # nothing was written


def test_unknown_schemes_and_writes_to_http_are_refused_at_start(tmp_path, capsys):
    assert main(["shards", "--source", "shapes", "--out", "s4://bucket/shards"]) == 2
    assert "unknown URL scheme s4://" in capsys.readouterr().err
    assert main(["shards", "--source", "shapes", "--out", "https://user:hunter2@example.org/shards"]) == 2
    err = capsys.readouterr().err
    assert "read-only" in err and "hunter2" not in err


def test_the_installed_backends_cover_the_schemes_the_readme_promises():
    for url in ("s3://b/x", "gs://b/x", "gcs://b/x", "https://example.org/x", "memory://x", "/tmp/x"):
        assert dio.backend_problem(url) is None, url


@pytest.mark.parametrize("command", ["train", "launch", "export"])
def test_a_run_directory_is_a_filesystem_path_not_a_url(command, tmp_path, capsys):
    config = decoder_job(tmp_path, str(tmp_path / "s.tar"), str(tmp_path / "emb"))
    argv = {"train": ["train", "--config", config, "--run-dir", "s3://bucket/run"],
            "launch": ["launch", "--config", config, "--nproc", "1", "--run-dir", "s3://bucket/run"],
            "export": ["export", "s3://bucket/run", "--out", str(tmp_path / "w.safetensors")]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "s3://bucket/run" in err and "shared filesystem path" in err, err
    assert not (tmp_path / "s3:").exists()  # no local folder named after the URL


@pytest.mark.parametrize("options", [{"secret": "hunter2"}, {"key": "AKIA", "secret": "hunter2"},
                                     {"client_kwargs": {"aws_secret_access_key": "hunter2"}},
                                     {"endpoint_url": "https://admin:hunter2@minio.internal:9000"}])
def test_storage_options_refuse_credentials_and_never_echo_them(options):
    from data_pipeline.config import SourceConfig

    with pytest.raises(ConfigError) as err:
        build_config(SourceConfig, {"shards": "s3://b/s.tar", "storage_options": options})
    assert "storage_options" in str(err.value) and "hunter2" not in str(err.value)


def test_storage_options_take_endpoints_and_public_bucket_modes():
    from data_pipeline.config import PrecomputeConfig, SourceConfig

    src = build_config(SourceConfig, {"shards": "s3://b/s.tar", "storage_options": {
        "endpoint_url": "https://minio.internal:9000", "config_kwargs": {"s3": {"addressing_style": "path"}}}})
    assert src.storage_options["endpoint_url"] == "https://minio.internal:9000"
    assert build_config(SourceConfig, {"shards": "gs://b/s.tar", "storage_options": {"token": "anon"}})
    job = build_config(PrecomputeConfig, {"storage_options": {"anon": True}})
    assert job.storage_options == {"anon": True} and job.out_storage_options is None


def test_the_most_specific_location_gives_the_storage_options():
    dio.set_storage_options("memory://opts/a", {"x": 1})
    dio.set_storage_options("memory://opts/a/b/", {"x": 2})
    try:
        assert dio.storage_options("memory://opts/a/s.tar") == {"x": 1}
        assert dio.storage_options("memory://opts/a/b/s.tar") == {"x": 2}
        assert dio.storage_options("memory://opts/ab/s.tar") == {}  # a sibling, not a child
        dio.set_storage_options("memory://opts/a/b", {})
        assert dio.storage_options("memory://opts/a/b/s.tar") == {"x": 1}
    finally:
        dio.set_storage_options("memory://opts/a", {})


def test_two_sources_may_not_give_one_folder_different_storage_options():
    from data_pipeline.config import DataConfig
    from data_pipeline.sources import use_storage_options

    data = build_config(DataConfig, {"sources": [
        {"shards": "memory://two/s-0.tar", "storage_options": {"anon": True}},
        {"shards": "memory://two/s-1.tar", "storage_options": {"anon": False}}]})
    with pytest.raises(ValueError, match=r"data.sources\[1\].storage_options: memory://two is also read by data.sources\[0\]"):
        use_storage_options(data)
    dio.set_storage_options("memory://two", {})


def test_a_backend_error_leaves_as_one_oserror_and_credentials_errors_are_not_retried():
    class NoCredentialsError(Exception):  # botocore's name; no retry can fix it
        pass

    calls = []

    def no_credentials():
        calls.append(1)
        raise NoCredentialsError("Unable to locate credentials")

    with pytest.raises(OSError, match="stat s3://b/x: NoCredentialsError: Unable to locate credentials"):
        dio.with_retries(no_credentials, "stat s3://b/x", base_delay=0)
    assert len(calls) == 1

    def unreachable():
        calls.append(1)
        raise RuntimeError('Could not connect to the endpoint URL: "http://admin:hunter2@127.0.0.1:9/b"')

    with pytest.raises(OSError) as err:
        dio.with_retries(unreachable, "open s3://b/x", attempts=2, base_delay=0)
    assert len(calls) == 3 and "hunter2" not in str(err.value) and "***@127.0.0.1" in str(err.value)


def test_a_missing_backend_in_library_use_is_a_clear_value_error():
    with pytest.raises(dio.MissingBackendError, match="pip install adlfs"):
        dio.exists(f"{MISSING}/s.tar")
    with pytest.raises(dio.MissingBackendError, match="pip install adlfs"):
        dio.open_url(f"{MISSING}/s.tar")


def test_a_remote_read_cut_off_mid_shard_is_an_oserror_the_tar_reader_skips(monkeypatch):
    import io

    import data_pipeline.tario as tario
    from data_pipeline.stats import SkipCounter

    with tario.TarWriter("memory://cut/s.tar") as w:
        for i in range(3):
            w.write(f"k{i}", {"txt": b"x" * 4000})
    data = fsspec.filesystem("memory").cat("/cut/s.tar")

    class CutOff(io.BytesIO):  # a client's own error type past its retries, as aiohttp's payload errors
        def read(self, n=-1):
            if self.tell() > 5000:
                raise RuntimeError("Response payload is not completed")
            return super().read(n)

    f = dio._OSErrorFile(CutOff(data), "s3://b/s.tar")
    assert len(f.read(6000)) == 6000
    with pytest.raises(OSError, match="read s3://b/s.tar: RuntimeError: Response payload is not completed"):
        f.read(1000)
    monkeypatch.setattr(tario, "open_url", lambda url: dio._OSErrorFile(CutOff(data), url))
    skips = SkipCounter()
    assert [s.key for s in tario.iter_tar("s3://b/s.tar", skips)] == ["k0"]
    assert skips.as_dict() == {"truncated_tar": 1}


def test_export_files_round_trip_through_any_fsspec_url_and_file_urls_are_paths(tmp_path):
    import torch

    from models.weights import StageWeights, WeightsError, read_weights, write_export

    weights = StageWeights("prior", 7, {"stage": "prior"}, {"w": torch.randn(3, 4), "n": torch.arange(5)}, "test")
    for url in ("memory://exports/prior.safetensors", f"file://{tmp_path}/sub/prior.safetensors"):
        write_export(weights, url)
        back = read_weights(url)
        assert (back.stage, back.step, back.config) == ("prior", 7, {"stage": "prior"})
        assert back.source == url.removeprefix("file://")
        assert back.state.keys() == weights.state.keys()
        assert all(torch.equal(back.state[k], weights.state[k]) for k in weights.state)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["prior.safetensors"]  # renamed into place
    with pytest.raises(WeightsError, match="^cannot read memory://exports/none.safetensors: no such file$"):
        read_weights("memory://exports/none.safetensors")
