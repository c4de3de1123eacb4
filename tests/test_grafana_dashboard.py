"""configs/monitoring/grafana-unclip.json: importable, templated, and only real metrics."""

import json
import re
from pathlib import Path

import yaml

from models import stages
from trainer.metrics import COMPONENT_PREFIX, SPECS, VALIDATION_PREFIX, exported_names

MONITORING = Path(__file__).resolve().parents[1] / "configs" / "monitoring"
ROWS = {"Progress and loss", "Validation", "Throughput and MFU", "Data pipeline health", "Checkpoints", "Memory"}
# metric names (unclip_*) and recording rules (level:unclip_*:ops) inside PromQL
NAME = re.compile(r"\b((?:[a-z_]+:)?unclip_[a-z0-9_]+(?::[a-z0-9_]+)?)\b")
NAME_REGEX = re.compile(r'__name__=~"([^"]+)"')


def _dashboard():
    return json.loads((MONITORING / "grafana-unclip.json").read_text())


def _panels(dashboard):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _recording_rules():
    groups = yaml.safe_load((MONITORING / "unclip-rules.yml").read_text())["groups"]
    return {rule["record"]: rule["expr"] for group in groups for rule in group["rules"] if "record" in rule}


def _names_in(expr):
    return set(NAME.findall(NAME_REGEX.sub("", expr)))


def test_dashboard_is_an_importable_grafana_dashboard():
    d = _dashboard()
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int)
    assert "id" not in d or d["id"] is None  # an id from another Grafana would clash on import
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("job", "stage"):
        assert variables[name]["type"] == "query" and variables[name]["multi"] and variables[name]["includeAll"]
        assert _names_in(variables[name]["query"]["query"]) <= exported_names()
    ids = [p["id"] for p in _panels(d)]
    assert len(ids) == len(set(ids))
    assert {p["title"] for p in d["panels"] if p["type"] == "row"} == ROWS
    for panel in _panels(d):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"], panel["title"]


def test_every_query_is_templated_and_uses_only_exported_metrics():
    rules = _recording_rules()
    exported = exported_names()
    for rule, expr in rules.items():
        assert _names_in(expr) <= exported, f"recording rule {rule} reads unknown metrics: {_names_in(expr) - exported}"
    seen = set()
    for panel in _panels(_dashboard()):
        for target in panel.get("targets", []):
            expr = target["expr"]
            assert 'job=~"$job"' in expr and 'stage=~"$stage"' in expr, f"{panel['title']}: not templated: {expr}"
            names = _names_in(expr)
            unknown = names - exported - set(rules)
            assert not unknown, f"{panel['title']} queries metrics the exporter does not define: {unknown}"
            for pattern in NAME_REGEX.findall(expr):
                # a name regex may only select the loss-component family unclip_loss_<name>
                assert pattern == COMPONENT_PREFIX + ".+", pattern
            seen |= names
    # every concern of the issue is on the dashboard
    for needed in ("unclip_loss", "unclip_mfu_ratio", "unclip_data_wait_ratio", "unclip_last_checkpoint_step", "unclip_memory_used_bytes"):
        assert needed in seen
    # and every validation figure: the shared ones and each stage's sampled metrics
    validation = {name for name in SPECS if name.startswith(VALIDATION_PREFIX)}
    for name in stages.names():
        spec = stages.get(name).validation
        validation |= {VALIDATION_PREFIX + metric for metric, _ in (spec.metrics if spec else ())}
    assert len(validation) >= 9 and validation <= seen, validation - seen


def test_validation_panels_sit_in_the_validation_row():
    panels = _dashboard()["panels"]
    start = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "Validation")
    end = next(i for i in range(start + 1, len(panels)) if panels[i]["type"] == "row")
    row = panels[start + 1 : end]
    assert row and all(VALIDATION_PREFIX in t["expr"] for p in row for t in p["targets"][:1])
    row_y = panels[start]["gridPos"]["y"]
    assert all(p["gridPos"]["y"] == row_y + 1 for p in row)
