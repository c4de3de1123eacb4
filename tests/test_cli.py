"""The `unclip` command line: help for every command, exit codes of the contract."""

import subprocess
import sys

import pytest

from launch.cli import build_parser, main

COMMANDS = ["demo", "shards", "precompute", "train", "sample", "export", "import", "launch"]


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "launch", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("command", COMMANDS + ["report"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"unclip {command}" in capsys.readouterr().out


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train"])  # --config is required
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_bad_config_exits_2_before_any_work(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("stage: decoder\ntrain: {steps: -3}\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.steps" in err and str(path) in err
    path.write_text("stage: decoder\n")
    assert main(["train", "--config", str(path), "--set", "deepspeed.zero_stage=4"]) == 2
    assert "deepspeed.zero_stage" in capsys.readouterr().err


def test_parser_accepts_the_documented_forms():
    parser = build_parser()
    args = parser.parse_args(["sample", "--weights", "a.safetensors", "b.safetensors", "--interpolate", "x.png", "y.png", "--out", "o"])
    assert args.interpolate == ["x.png", "y.png"] and len(args.weights) == 2
    args = parser.parse_args(["launch", "--config", "c.yaml", "--nnodes", "2", "--node-rank", "1", "--master-addr", "h"])
    assert args.nnodes == 2 and args.node_rank == 1
    args = parser.parse_args(["import", "--from", "diffusers", "karlo-v1", "--out", "w"])
    assert (args.source_format, args.folder, args.out) == ("diffusers", "karlo-v1", "w")
    args = parser.parse_args(["export", "runs/prior", "runs/decoder", "--out", "o", "--format", "diffusers"])
    assert args.export_format == "diffusers" and args.run_dirs == ["runs/prior", "runs/decoder"]
    args = parser.parse_args(["train", "--config", "c.yaml", "--init-from", "w/decoder.safetensors"])
    assert args.init_from == "w/decoder.safetensors"
