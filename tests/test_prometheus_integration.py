"""A real Prometheus scrapes a 2-rank job through the shipped scrape config and rules.

Starts Debian's `prometheus` on 127.0.0.1 (free port, temp TSDB, scrape every second) with
configs/monitoring/prometheus.yml, writes the job's file-SD targets the way a launcher
does, runs a 2-rank gloo job that logs through `trainer.metrics.Metrics` exactly as the
trainer does (one all-reduce per logging step, per-rank exporters on port + local rank),
then asks Prometheus's HTTP API what it scraped.
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
JOB, STAGE = "itest", "decoder"
STEPS, LOG_EVERY, BATCH = 40, 4, 8

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


def _run_job(tmp_path: Path, metrics_port: int) -> None:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_ports(1)), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(metrics_port), str(tmp_path / "run")],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's `prometheus` binary is not installed (.ci/run installs it)")
def test_real_prometheus_scrapes_both_ranks(tmp_path):
    from launch.monitoring import remove_targets, write_targets

    prom_port, metrics_port = _free_ports(1), _free_ports(2)
    prom = f"http://127.0.0.1:{prom_port}"
    write_targets(tmp_path / "targets", JOB, STAGE, ["127.0.0.1"], metrics_port, nproc_per_node=2, per_rank=True)
    server = _start_prometheus(tmp_path, prom_port)
    try:
        _run_job(tmp_path, metrics_port)
        remove_targets(tmp_path / "targets", JOB)
        window = f'{{job="{JOB}",stage="{STAGE}"}}[5m]'

        def by_rank(name: str) -> dict[str, list[float]]:
            return {s["metric"]["rank"]: [float(v) for _, v in s["values"]] for s in _query(prom, name + window)}

        loss, samples, steps = by_rank("unclip_loss"), by_rank("unclip_samples_total"), by_rank("unclip_step_time_seconds_count")
        for series in (loss, samples, steps):
            assert {"0", "1", "all"} <= set(series), series.keys()
        for rank, values in samples.items():
            assert all(b >= a for a, b in zip(values, values[1:])), f"samples_total of rank {rank} went down: {values}"
            assert len(set(values)) >= 2, f"rank {rank}: expected the counter to grow across scrapes, got {values}"
        per_rank_final = STEPS * BATCH
        assert samples["0"][-1] == samples["1"][-1] == per_rank_final
        assert samples["all"][-1] == 2 * per_rank_final
        assert steps["0"][-1] == STEPS  # one histogram count per optimizer step
        # the job's loss is the mean of the ranks' (rank r logs 1/(step + r))
        last = STEPS
        assert loss["all"][-1] == pytest.approx((1 / last + 1 / (last + 1)) / 2)
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


def _stand_in_rank(metrics_port: int, run_dir: str) -> None:
    """One rank of a 2-rank job logging like trainer/loop.py: a logging step every LOG_EVERY steps."""
    import torch.distributed as dist

    from trainer.config import MetricsConfig
    from trainer.metrics import Metrics

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = MetricsConfig(port=metrics_port, peak_flops=1e10)
    metrics = Metrics(JOB, STAGE, rank, 2, Path(run_dir), cfg, local_rank, per_rank=True).start()
    assert metrics.port == metrics_port + local_rank
    step_time = 0.12
    for step in range(1, STEPS + 1):
        time.sleep(step_time)
        if step % LOG_EVERY == 0:
            metrics.set_skipped_samples({"undecodable_image": step // 10})
            metrics.log_step(
                step, loss=1 / (step + rank), samples_total=step * BATCH, lr=1e-3, grad_norm=1.0,
                step_time_s=step_time, data_wait_s=0.01, components={"mse": 0.5 / step}, flops_per_sample=1e6,
            )
    metrics.checkpoint_saved(STEPS, 0.5)
    time.sleep(2.5)  # let the last values be scraped before the servers go away
    metrics.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _stand_in_rank(int(sys.argv[1]), sys.argv[2])
