"""trainer.metrics: names, values served over HTTP, the job aggregate, jsonl, pushes."""

from __future__ import annotations

import inspect
import json
import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from trainer import metrics as M
from trainer.config import MetricsConfig
from trainer.metrics import SPECS, Metrics, NullMetrics
from trainer.monitors import monitor_events


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[tuple, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(scraped: dict, name: str, **labels: str) -> float:
    matches = [v for (n, ls), v in scraped.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items())]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def test_names_follow_prometheus_conventions():
    for name, spec in SPECS.items():
        assert name.startswith("unclip_") and name == name.lower(), name
        assert (spec.kind == "counter") == name.endswith("_total"), name
        if "timestamp" in name:
            assert name.endswith("_timestamp_seconds"), name
        if "ratio" in name or "mfu" in name:
            assert name.endswith("_ratio"), name
        assert not name.startswith(M.COMPONENT_PREFIX), f"{name} would collide with loss components"
        assert not any(unit in name for unit in ("_ms", "_millis", "_mb", "_gb", "_percent")), name
    assert M.component_name("MSE loss") == "unclip_loss_mse_loss"
    with pytest.raises(ValueError, match="component"):
        M.component_name("??")


def _log(m: Metrics, step: int, samples: int, **kw):
    args = dict(loss=0.5, samples_total=samples, lr=1e-3, grad_norm=2.0, step_time_s=0.1, data_wait_s=0.025)
    args.update(kw)
    return m.log_step(step, **args)


def test_single_rank_serves_and_writes_jsonl(tmp_path, capsys):
    port = _free_port()
    cfg = MetricsConfig(port=port, peak_flops=1e9)
    m = Metrics("demo-dec", "decoder", 0, 1, tmp_path, cfg).start()
    try:
        assert m.port == port
        for seconds in [0.05, 0.15] * 5:  # 10 steps whose window mean is 0.1 s
            m.observe_step(seconds)
        _log(m, 10, 80, components={"mse": 0.4, "vb": 0.1}, flops_per_sample=2e6)
        m.set_skipped_samples({"undecodable_image": 3, "no such reason": 2})
        m.count_skipped_step("nonfinite_loss")
        for _ in range(20):
            m.observe_step(0.2)
        record = _log(m, 30, 240, step_time_s=0.2, data_wait_s=0.05,
                      validation={"loss": 0.75, "seconds": 1.5, "decoder_clip_score": 0.25})
        m.checkpoint_saved(30, 1.25)
        scraped = _scrape(port)
    finally:
        m.close()
    # 160 samples over 20 steps of 0.2 s: 40 samples/s; FLOP/s and MFU follow exactly
    assert record["unclip_samples_per_second"] == pytest.approx(40.0)
    assert record["unclip_model_flops_per_second"] == pytest.approx(2e6 * 40)
    assert record["unclip_mfu_ratio"] == pytest.approx(2e6 * 40 / 1e9)
    assert record["unclip_data_wait_ratio"] == pytest.approx(0.25)
    assert record["unclip_skipped_samples_total"] == {"undecodable_image": 3, "other": 2}
    for rank in ("0", "all"):
        assert _value(scraped, "unclip_loss", rank=rank) == 0.5
        assert _value(scraped, "unclip_loss_vb", rank=rank) == 0.1
        assert _value(scraped, "unclip_samples_total", rank=rank) == 240
        assert _value(scraped, "unclip_steps_total", rank=rank) == 30
        assert _value(scraped, "unclip_mfu_ratio", rank=rank) == pytest.approx(0.08)
        # each step's own time, not its window's mean: half of the first 10 steps took 0.05 s
        assert _value(scraped, "unclip_step_time_seconds_count", rank=rank) == 30
        assert _value(scraped, "unclip_step_time_seconds_sum", rank=rank) == pytest.approx(5 * 0.05 + 5 * 0.15 + 20 * 0.2)
        assert _value(scraped, "unclip_step_time_seconds_bucket", rank=rank, le="0.05") == 5
        assert _value(scraped, "unclip_step_time_seconds_bucket", rank=rank, le="0.1") == 5
        assert _value(scraped, "unclip_step_time_seconds_bucket", rank=rank, le="0.25") == 30
        # validation values (job-wide already) are gauges of their own
        assert _value(scraped, "unclip_validation_loss", rank=rank) == 0.75
        assert _value(scraped, "unclip_validation_seconds", rank=rank) == 1.5
        assert _value(scraped, "unclip_validation_decoder_clip_score", rank=rank) == 0.25
        assert _value(scraped, "unclip_skipped_samples_total", rank=rank, reason="other") == 2
        assert _value(scraped, "unclip_skipped_steps_total", rank=rank, reason="nonfinite_loss") == 1
        assert _value(scraped, "unclip_last_checkpoint_step", rank=rank) == 30
        assert _value(scraped, "unclip_memory_used_bytes", rank=rank) > 1e6
    for (name, labels), _ in scraped.items():
        assert set(dict(labels)) <= {"job", "stage", "rank", "reason", "le"}, (name, labels)
        assert dict(labels)["job"] == "demo-dec" and dict(labels)["stage"] == "decoder"
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 30]
    assert lines[0]["unclip_loss_mse"] == 0.4 and lines[1]["unclip_samples_total"] == 240
    assert set(lines[1]) - {"step", "time", "job", "stage"} <= set(M.metric_specs()) | {"unclip_loss_mse", "unclip_loss_vb"}
    assert "unclip_validation_loss" not in lines[0] and lines[1]["unclip_validation_loss"] == 0.75
    assert lines[1]["unclip_step_time_seconds"] == 0.2  # the window mean, as logged
    assert (tmp_path / "report.png").is_file()  # drawn at close
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "step 30" in out[1] and "40.0 samples/s" in out[1] and "MFU 8.0%" in out[1]


def test_job_aggregate_comes_from_one_all_reduce(monkeypatch):
    """Rank 0 of 2: loss/step time averaged, samples/memory summed, step/lr its own."""
    calls = []
    other = {"unclip_loss": 1.5, "unclip_step_time_seconds": 0.3, "unclip_data_wait_seconds": 0.1, "unclip_loss_mse": 0.7}

    def fake_all_reduce(tensor):
        calls.append(tensor.clone())
        # what rank 1 would contribute: the same layout, its own values
        n_mean = len(M._MEAN_KEYS) + 1
        keys = list(M._MEAN_KEYS) + ["unclip_loss_mse"]
        for i, key in enumerate(keys):
            tensor[i] += other[key]
        for i in range(n_mean, n_mean + len(M._SUM_KEYS)):
            tensor[i] *= 2  # rank 1 mirrors rank 0's extensive values
        tensor[n_mean + len(M._SUM_KEYS) + M.SAMPLE_SKIP_REASONS.index("image_too_small")] += 4

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    m = Metrics("j", "prior", 0, 2, None, MetricsConfig(), console=False).start()
    record = _log(m, 5, 40, loss=0.5, step_time_s=0.1, data_wait_s=0.0, components={"mse": 0.3})
    m.close()
    assert len(calls) == 1 and calls[0].dtype == torch.float64
    assert record["unclip_loss"] == pytest.approx(1.0)
    assert record["unclip_loss_mse"] == pytest.approx(0.5)
    assert record["unclip_step_time_seconds"] == pytest.approx(0.2)
    assert record["unclip_samples_total"] == 80
    assert record["unclip_samples_per_second"] == pytest.approx(2 * 40 / (5 * 0.1))
    assert record["unclip_steps_total"] == 5 and record["unclip_learning_rate"] == 1e-3
    assert record["unclip_skipped_samples_total"] == {"image_too_small": 4}
    assert m._series[("unclip_loss", "0", "")] == 0.5 and m._series[("unclip_loss", "all", "")] == 1.0


def test_ranks_without_a_process_group_export_only_their_own(tmp_path):
    m = Metrics("pre", "precompute", 1, 4, tmp_path, MetricsConfig(), console=False)
    m.start()
    assert m.exports  # no process group: rank 0 cannot aggregate, so every rank serves its own
    assert _log(m, 3, 30) is None  # only rank 0 writes records
    m.precompute_progress(samples=120, shards=2)
    m.close()
    assert not (tmp_path / "metrics.jsonl").exists()
    assert {rank for (_, rank, _) in m._series} == {"1"}
    assert m._series[("unclip_precompute_shards_total", "1", "")] == 2


def test_step_skip_reasons_are_bounded():
    m = Metrics("j", "prior", 0, 1, None, MetricsConfig(), console=False)
    for i in range(M.MAX_STEP_SKIP_REASONS + 5):
        m.count_skipped_step(f"reason_{i}")
    reasons = {reason for (name, rank, reason) in m._series if name == "unclip_skipped_steps_total" and rank == "0"}
    assert len(reasons) == M.MAX_STEP_SKIP_REASONS + 1 and "other" in reasons
    assert m._series[("unclip_skipped_steps_total", "0", "other")] == 5


def test_busy_port_does_not_stop_the_job(caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        m = Metrics("j", "prior", 0, 1, None, MetricsConfig(port=port), console=False).start()
        assert m.port is None
        assert "cannot serve" in caplog.text
        _log(m, 1, 8)
        m.close()


def test_per_rank_exporter_serves_on_port_plus_local_rank():
    base = _free_port()
    m = Metrics("j", "decoder", 3, 4, None, MetricsConfig(port=base - 1), local_rank=1, per_rank=True, console=False)
    m.start()
    try:
        assert m.port == base
        m.precompute_progress(10, 1)
        assert _value(_scrape(base), "unclip_precompute_samples_total", rank="3") == 10
    finally:
        m.close()


class _Gateway(BaseHTTPRequestHandler):
    pushes: list = []

    def do_PUT(self):
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        _Gateway.pushes.append((self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_pushgateway_gets_the_series_and_a_final_push():
    server = HTTPServer(("127.0.0.1", 0), _Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Gateway.pushes.clear()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        m = Metrics("short-job", "precompute", 0, 1, None, MetricsConfig(pushgateway=url), console=False, push_interval_s=60)
        m.start()
        m.precompute_progress(samples=500, shards=5)
        m.close()
    finally:
        server.shutdown()
    assert _Gateway.pushes, "nothing was pushed"
    path, body = _Gateway.pushes[-1]
    assert path == "/metrics/job/short-job/instance/precompute-rank0"
    assert 'unclip_precompute_samples_total{job="short-job",rank="0",stage="precompute"} 500.0' in body


def test_null_metrics_has_the_same_interface():
    for name, member in inspect.getmembers(Metrics, inspect.isfunction):
        if not name.startswith("_"):
            assert hasattr(NullMetrics, name), name
    null = NullMetrics().start()
    null.log_step(1, loss=1.0, samples_total=1, lr=1.0, grad_norm=None, step_time_s=1.0, data_wait_s=0.0)
    null.close()


def test_rank_outside_world_is_rejected():
    with pytest.raises(ValueError, match="rank 2"):
        Metrics("j", "prior", 2, 2, None, MetricsConfig())


def test_in_a_process_group_only_rank0_serves_unless_per_rank(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.delenv(M.PER_RANK_ENV, raising=False)
    assert not Metrics("j", "prior", 1, 2, None, MetricsConfig(), console=False).start().exports
    assert Metrics("j", "prior", 1, 2, None, MetricsConfig(), per_rank=True, console=False).start().exports
    monkeypatch.setenv(M.PER_RANK_ENV, "1")  # what a launcher sets for all its ranks
    assert Metrics("j", "prior", 1, 2, None, MetricsConfig(), console=False).start().exports


def test_readme_lists_every_metric():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "configs" / "monitoring" / "README.md").read_text()
    assert set(M.metric_specs()) > set(SPECS)  # with every stage's sampled validation metrics
    for name in M.metric_specs():
        assert f"| `{name}` |" in readme, f"configs/monitoring/README.md does not document {name}"


def test_other_ranks_take_part_in_the_reduce_but_do_not_speak_for_the_job(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: calls.append(t))
    m = Metrics("j", "prior", 1, 2, None, MetricsConfig(), per_rank=True, console=False).start()
    m.observe_step(0.1)
    assert _log(m, 5, 40) is None
    m.close()
    assert len(calls) == 1  # the collective happens on every rank
    assert {rank for (_, rank, _) in m._series} == {"1"} and set(m._hists) == {"1"}


def test_a_non_finite_loss_is_logged_as_json_null(tmp_path, capsys):
    m = Metrics("j", "prior", 0, 1, tmp_path, MetricsConfig()).start()
    _log(m, 1, 8, loss=float("nan"), grad_norm=float("inf"))
    _log(m, 2, 16, loss=0.5)
    m.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    first = json.loads(text.splitlines()[0])
    assert first["unclip_loss"] is None and first["unclip_grad_norm"] is None
    assert "loss nan" in capsys.readouterr().out
    assert (tmp_path / "report.png").is_file()


def test_rank0_of_a_job_observes_its_steps_for_the_job_too(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    m = Metrics("j", "prior", 0, 2, None, MetricsConfig(), console=False).start()
    for seconds in (0.02, 0.3, 70.0):
        m.observe_step(seconds)
    # one count per step in its own bucket (the last beyond every bound: +Inf)
    expected = [0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1]  # le 0.025, le 0.5, +Inf
    assert m._hists["0"].counts == m._hists["all"].counts == expected
    assert m._hists["0"].sum == pytest.approx(70.32)


def test_a_resumed_run_reports_samples_per_step_from_its_totals():
    m = Metrics("j", "prior", 0, 1, None, MetricsConfig(), console=False).start()
    record = _log(m, 1020, 8160, step_time_s=0.1)  # resumed at step 1000: totals include earlier steps
    assert record["unclip_samples_per_second"] == pytest.approx(8 / 0.1)  # 8 samples per step
    assert record["unclip_steps_total"] == 1020 and record["unclip_samples_total"] == 8160
    assert not m._hists  # no step observed: the histogram is not filled from window means


class _FailingMonitor:
    enabled = True

    def __init__(self):
        self.events = []

    def write_events(self, events):
        self.events.append(events)
        raise ConnectionError("wandb.ai unreachable")


def test_every_logged_number_goes_to_deepspeeds_monitors_and_their_outage_is_survived(caplog):
    monitor = _FailingMonitor()
    m = Metrics("j", "prior", 0, 1, None, MetricsConfig(), console=False, monitor=monitor).start()
    _log(m, 1, 8)
    _log(m, 2, 16, validation={"loss": 0.7})
    m.close()
    assert [dict((tag, v) for tag, v, _ in events)["unclip/loss"] for events in monitor.events] == [0.5, 0.5]
    assert ("unclip/validation_loss", 0.7, 2) in monitor.events[1]
    assert "monitor write failed (1 so far)" in caplog.text


def test_monitor_events_carry_every_logged_number():
    record = {"step": 7, "time": 1.0, "job": "j", "stage": "prior", "unclip_loss": 0.5, "unclip_grad_norm": None,
              "unclip_validation_loss": 0.75, "unclip_last_log_timestamp_seconds": 1e9, "unclip_world_size": 2,
              "unclip_skipped_steps_total": {"nonfinite": 1}}
    assert monitor_events(record) == [
        ("unclip/loss", 0.5, 7), ("unclip/validation_loss", 0.75, 7), ("unclip/world_size", 2.0, 7),
    ]
