"""Job configs: YAML safety, inheritance, overrides, and validation errors that name the key."""

import textwrap

import pytest

from launch.config_files import apply_override, build_job, dump_config, load_config, parse_yaml
from models.config import ConfigError
from models.decoder import UpsamplerConfig
from models.prior import ARPriorConfig, DiffusionPriorConfig
from models import stages
from trainer.config import job_class


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def _error(data) -> str:
    with pytest.raises(ConfigError) as info:
        build_job(data, "job.yaml")
    return str(info.value)


def test_unknown_key_is_named_with_its_path():
    msg = _error({"stage": "prior", "model": {"kind": "diffusion", "dimm": 3}})
    assert "model.dimm" in msg and "unknown key" in msg and "job.yaml" in msg


def test_wrong_type_is_named():
    msg = _error({"stage": "decoder", "optim": {"lr": "fast"}})
    assert "optim.lr" in msg and "number" in msg and "'fast'" in msg


def test_negative_steps_rejected():
    msg = _error({"stage": "decoder", "train": {"steps": -5}})
    assert "train.steps" in msg and "greater than 0" in msg


def test_zero_stage_4_rejected():
    msg = _error({"stage": "prior", "deepspeed": {"zero_stage": 4}})
    assert "deepspeed.zero_stage" in msg and "0, 1, 2 or 3" in msg


def test_upsampler_must_enlarge():
    msg = _error({"stage": "upsampler", "model": {"lowres_size": 256, "image_size": 64}})
    assert "image_size (64) must be larger than lowres_size (256)" in msg
    with pytest.raises(ValueError):
        UpsamplerConfig(lowres_size=64, image_size=64)


def test_unknown_stage_lists_choices():
    msg = _error({"stage": "vae"})
    assert "stage" in msg and "decoder" in msg and "prior" in msg


def test_prior_kind_selects_the_model_config():
    job = build_job({"stage": "prior", "model": {"kind": "autoregressive", "num_buckets": 16}})
    assert isinstance(job, job_class(stages.get("prior"))) and isinstance(job.model, ARPriorConfig)
    assert job.model.num_buckets == 16
    assert isinstance(build_job({"stage": "prior"}).model, DiffusionPriorConfig)
    assert "model.kind" in _error({"stage": "prior", "model": {"kind": "gan"}})


def test_multiple_errors_are_all_reported():
    msg = _error({"stage": "decoder", "train": {"steps": 0, "micro_batch_size": "x"}})
    assert "train.steps" in msg and "train.micro_batch_size" in msg


def test_base_inheritance_and_overrides(tmp_path):
    _write(tmp_path, "base/decoder.yaml", """
        stage: decoder
        model:
          image_size: 64
          unet: {base_channels: 64, channel_mults: [1, 2]}
        train: {steps: 1000, micro_batch_size: 8}
    """)
    child = _write(tmp_path, "demo/decoder.yaml", """
        base: ../base/decoder.yaml
        model:
          image_size: 16
        optim: {lr: 3e-4}
    """)
    job = load_config(child, ["train.steps=50", "deepspeed.zero_stage=3", "model.unet.channel_mults=[1, 2, 2]"])
    assert isinstance(job, job_class(stages.get("decoder")))
    assert job.model.image_size == 16  # child wins
    assert job.model.unet.base_channels == 64  # inherited, merged key by key
    assert job.model.unet.channel_mults == (1, 2, 2)  # --set parsed as data
    assert job.train.steps == 50 and job.train.micro_batch_size == 8
    assert job.optim.lr == pytest.approx(3e-4)  # 3e-4 is a float, not a string
    assert job.deepspeed.zero_stage == 3


def test_override_errors_name_the_key(tmp_path):
    path = _write(tmp_path, "job.yaml", "stage: decoder\ntrain: {steps: 10}\n")
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(path, ["train.steps=-1"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(path, ["train.steps"])
    with pytest.raises(ConfigError, match="train.steps is a value"):
        load_config(path, ["train.steps.x=1"])
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(path, ["train.stepz=5"])


def test_base_cycle_and_missing_file(tmp_path):
    _write(tmp_path, "a.yaml", "base: b.yaml\nstage: prior\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely():
    with pytest.raises(ConfigError):
        parse_yaml("x: !!python/object/apply:os.system ['echo pwned']")
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        parse_yaml("lr: 1\nlr: 2\n")
    data = {}
    with pytest.raises(ConfigError):
        apply_override(data, "name=!!python/name:os.system")


def test_resolved_config_round_trips(tmp_path):
    job = build_job({"stage": "prior", "model": {"kind": "diffusion", "depth": 3}, "train": {"steps": 7}})
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(job))
    assert load_config(path) == job
    assert path.read_text().startswith("stage: prior")
