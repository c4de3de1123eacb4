"""Shipped scrape config, recording rules and the file-SD writer."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from launch.monitoring import main, remove_targets, scrape_targets, targets_file, write_targets

MONITORING = Path(__file__).resolve().parents[1] / "configs" / "monitoring"


def test_scrape_targets_for_rank0_only_and_per_rank():
    assert scrape_targets(["n1", "n2"], 9400, nproc_per_node=4) == ["n1:9400"]
    assert scrape_targets(["n1", "n2"], 9400, nproc_per_node=2, per_rank=True) == ["n1:9400", "n1:9401", "n2:9400", "n2:9401"]
    with pytest.raises(ValueError, match="at least one host"):
        scrape_targets([], 9400)
    with pytest.raises(ValueError, match="not valid TCP ports"):
        scrape_targets(["n1"], 65535, nproc_per_node=2, per_rank=True)


def test_write_and_remove_targets(tmp_path):
    path = write_targets(tmp_path, "decoder/64 run", "decoder", ["a", "b"], 9000, nproc_per_node=2, per_rank=True)
    assert path == targets_file(tmp_path, "decoder/64 run") and path.parent == tmp_path
    assert json.loads(path.read_text()) == [
        {"targets": ["a:9000", "a:9001", "b:9000", "b:9001"], "labels": {"job": "decoder/64 run", "stage": "decoder"}}
    ]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    assert remove_targets(tmp_path, "decoder/64 run") and not path.exists()
    assert not remove_targets(tmp_path, "decoder/64 run")


def test_command_line_writer(tmp_path, capsys):
    assert main(["write", "--dir", str(tmp_path), "--job", "p", "--stage", "prior", "--hosts", "h1,h2", "--port", "9100"]) == 0
    assert json.loads(targets_file(tmp_path, "p").read_text())[0]["targets"] == ["h1:9100"]
    assert main(["write", "--dir", str(tmp_path), "--job", "p", "--stage", "prior", "--hosts", "", "--port", "9100"]) == 2
    assert main(["remove", "--dir", str(tmp_path), "--job", "p"]) == 0 and not targets_file(tmp_path, "p").exists()


def test_scrape_config_honours_the_exporters_job_label():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["honor_labels"] is True
    assert job["file_sd_configs"][0]["files"] == ["targets/*.json"]
    assert config["rule_files"] == ["unclip-rules.yml"] and (MONITORING / "unclip-rules.yml").is_file()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus package) is not installed")
def test_promtool_accepts_config_and_rules():
    for args in (["check", "rules", "unclip-rules.yml"], ["check", "config", "prometheus.yml"]):
        out = subprocess.run(["promtool", *args], cwd=MONITORING, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


def test_published_targets_live_as_long_as_the_job(tmp_path, monkeypatch):
    from launch.monitoring import published

    monkeypatch.setenv("UNCLIP_PROMETHEUS_TARGETS", str(tmp_path))
    monkeypatch.setenv("UNCLIP_METRICS_PER_RANK", "1")
    with published("j", "prior", ["127.0.0.1"], 9300, nproc_per_node=2) as path:
        assert json.loads(path.read_text())[0]["targets"] == ["127.0.0.1:9300", "127.0.0.1:9301"]
    assert not path.exists()
    with published("j", "prior", ["127.0.0.1"], None) as nothing:  # no metrics port: nothing to scrape
        assert nothing is None and not list(tmp_path.iterdir())


def test_sbatch_lines_publish_every_node_and_clean_up(tmp_path):
    from launch.monitoring import sbatch_lines

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # what SLURM answers for a 2-node allocation
    scontrol.write_text('#!/bin/sh\necho gpu-01\necho gpu-02\n')
    scontrol.chmod(0o755)
    import sys

    script = "\n".join(sbatch_lines("dec 64", "decoder", 9400, per_rank=True, python=sys.executable))
    script += f'\ncp "$UNCLIP_PROMETHEUS_TARGETS"/*.json {tmp_path}/seen.json\n'
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "UNCLIP_PROMETHEUS_TARGETS": str(tmp_path / "t"),
           "SLURM_JOB_NODELIST": "gpu-[01-02]", "SLURM_NTASKS_PER_NODE": "2", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen[0]["targets"] == ["gpu-01:9400", "gpu-01:9401", "gpu-02:9400", "gpu-02:9401"]
    assert seen[0]["labels"] == {"job": "dec 64", "stage": "decoder"}
    assert not list((tmp_path / "t").iterdir())  # removed when the script exited
