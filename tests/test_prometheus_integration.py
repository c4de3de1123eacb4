"""A real Prometheus scrapes a real 2-rank training job through the shipped config and rules.

Starts Debian's `prometheus` on 127.0.0.1 (free port, temp TSDB, scrape every second) with
configs/monitoring/prometheus.yml, publishes the job's file-SD targets the way a launcher
does (launch/monitoring.py), runs `unclip train --nproc 2` on the demo prior (synthetic
data, validated every 25 steps) with per-rank exporters, then asks Prometheus's HTTP API
what it scraped.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "configs" / "monitoring"
JOB, STAGE = "itest", "prior"
STEPS, LOG_EVERY, BATCH, VALIDATE_EVERY = 100, 2, 4, 25

pytestmark = pytest.mark.slow


def _free_ports(count: int) -> int:
    """A base port with `count` consecutive free ports after it."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no run of free ports found")


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _query(prom: str, expr: str) -> list[dict]:
    body = _get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body["status"] == "success", body
    return body["data"]["result"]


def _start_prometheus(tmp_path: Path, port: int) -> subprocess.Popen:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"}
    config["rule_files"] = [str(MONITORING / "unclip-rules.yml")]
    sd = config["scrape_configs"][0]["file_sd_configs"][0]
    sd["files"], sd["refresh_interval"] = [str(tmp_path / "targets" / "*.json")], "1s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen(
        [
            shutil.which("prometheus"),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    proc.kill()
    pytest.fail("prometheus did not become ready:\n" + (tmp_path / "prometheus.log").read_text()[-3000:])


def _train(run_dir: Path, metrics_port: int) -> None:
    """`unclip train --nproc 2` of the demo prior, exporting from both ranks."""
    command = [sys.executable, "-m", "launch", "train", "--config", str(ROOT / "configs" / "demo" / "prior.yaml")]
    command += ["--run-dir", str(run_dir), "--nproc", "2", "--metrics-port", str(metrics_port)]
    # data=null: the stage's synthetic batches, whatever data the demo config names
    for override in ("data=null", f"name={JOB}", f"train.steps={STEPS}", f"train.log_every={LOG_EVERY}",
                     f"train.micro_batch_size={BATCH}", "checkpoint.every_steps=1000",
                     f"validation.every_steps={VALIDATE_EVERY}", "validation.batches=2", "validation.sample_steps=4"):
        command += ["--set", override]
    env = dict(os.environ, UNCLIP_METRICS_PER_RANK="1", OMP_NUM_THREADS="1")
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's `prometheus` binary is not installed (.ci/run installs it)")
def test_real_prometheus_scrapes_both_ranks(tmp_path):
    from launch.monitoring import published

    prom_port, metrics_port = _free_ports(1), _free_ports(2)
    prom = f"http://127.0.0.1:{prom_port}"
    server = _start_prometheus(tmp_path, prom_port)
    try:
        with published(JOB, STAGE, ["127.0.0.1"], metrics_port, nproc_per_node=2, per_rank=True, targets_dir=tmp_path / "targets"):
            _train(tmp_path / "run", metrics_port)
        window = f'{{job="{JOB}",stage="{STAGE}"}}[5m]'

        def by_rank(name: str) -> dict[str, list[tuple[float, float]]]:
            result = _query(prom, name + window)
            ranks = [s["metric"]["rank"] for s in result]
            assert len(ranks) == len(set(ranks)), f"{name}: a rank's series came from two targets: {result}"
            return {s["metric"]["rank"]: [(t, float(v)) for t, v in s["values"]] for s in result}

        loss, samples, steps = by_rank("unclip_loss"), by_rank("unclip_samples_total"), by_rank("unclip_step_time_seconds_count")
        validation = by_rank("unclip_validation_loss")
        for series in (loss, samples, steps, validation, by_rank("unclip_validation_prior_image_cosine")):
            assert {"0", "1", "all"} <= set(series), series.keys()
        for rank, points in samples.items():
            values = [v for _, v in points]
            assert all(b >= a for a, b in zip(values, values[1:])), f"samples_total of rank {rank} went down: {values}"
            assert len(set(values)) >= 2, f"rank {rank}: expected the counter to grow across scrapes, got {values}"
        # rank 0 serves its own and the job's series in one scrape: the job's samples are the
        # sum over both ranks, which consume equal shares
        own, job = dict(samples["0"]), dict(samples["all"])
        common = sorted(set(own) & set(job))
        assert common and all(job[t] == 2 * own[t] for t in common)
        records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["step"] == STEPS and records[-1]["unclip_samples_total"] == STEPS * BATCH * 2
        # job-wide already: every rank exports the held-out loss of the validation steps
        validated = {r["unclip_validation_loss"] for r in records if "unclip_validation_loss" in r}
        assert len(validated) == STEPS // VALIDATE_EVERY
        for rank, points in validation.items():
            assert {v for _, v in points} <= validated, rank
        assert max(job.values()) <= STEPS * BATCH * 2
        assert (tmp_path / "run" / "report.png").is_file()
        # the shipped recording rules load and evaluate on these series
        rule = _query(prom, f'job_stage:unclip_samples_per_second:sum{{job="{JOB}"}}[5m]')
        assert rule and rule[0]["metric"]["stage"] == STAGE
        up = _query(prom, f'up{{job="{JOB}"}}[5m]')
        assert len(up) == 2  # both per-rank targets from the SD file, labelled with the job
        # every dashboard query is valid PromQL for this Prometheus
        dashboard = json.loads((MONITORING / "grafana-unclip.json").read_text())
        for expr in _dashboard_exprs(dashboard):
            _query(prom, expr.replace("$job", JOB).replace("$stage", STAGE).replace("$__rate_interval", "1m"))
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def _dashboard_exprs(dashboard: dict) -> list[str]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return [t["expr"] for p in panels for t in p.get("targets", [])]
