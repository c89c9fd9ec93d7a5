"""The Grafana dashboards: current with their generator, well-formed, and every PromQL expression names only
metrics that pdserve exports -- read from the code that registers them, and from the catalog
(pdserve.operator.metrics_catalog), which must list exactly those."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pdserve.operator import dashboards, metrics_catalog

DASHBOARD_DIR = Path(__file__).resolve().parents[2] / "charts" / "pdserve" / "dashboards"
FILES = sorted(DASHBOARD_DIR.glob("*.json"))
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}


def test_files_are_current() -> None:
    """Regenerate with: python -m pdserve.operator.dashboards charts/pdserve/dashboards"""
    assert {p.name: p.read_text() for p in FILES} == dashboards.render_all()


def metric_names(expr: str) -> set[str]:
    """The series a PromQL expression selects: identifiers that are not functions, keywords or label names."""
    label_values = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_]\w*\s*\)\s*", expr)
    if label_values:  # a Grafana variable query: label_values(<selector>, <label>)
        expr = label_values.group(1)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    expr = re.sub(r"\{[^{}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        follows = expr[match.end():].lstrip()[:1]
        if follows != "(" and match.group() not in KEYWORDS:
            names.add(match.group())
    return names


def test_metric_name_extraction() -> None:
    assert metric_names('histogram_quantile(0.9, sum by (le, role) (rate(a_bucket{x=~"$y"}[5m])))') == {"a_bucket"}
    assert metric_names("sum(rate(a:b_total[1m])) / sum without (pod) (c) > bool 0") == {"a:b_total", "c"}
    assert metric_names('label_values(m{namespace=~"$namespace"}, model_name)') == {"m"}


def registered_series() -> dict[str, str]:
    """Series name -> type of every metric the servers register: built as the servers build them, then read
    from the Prometheus registry (what /metrics would expose)."""
    pytest.importorskip("prometheus_client")
    api = pytest.importorskip("pdserve.services.api.metrics")
    router = pytest.importorskip("pdserve.services.router.metrics")
    anatomy = pytest.importorskip("pdserve.services.router.anatomy")
    kv = pytest.importorskip("pdserve.engine.kv_transfer.metrics")
    registry = api.ServingMetrics("model").registry  # engines, and routers (client-side latency)
    router.RouterMetrics(registry)
    anatomy.AnatomyMetrics(registry)
    registry.register(kv.KVTransferCollector(lambda: kv.KVTransferStats(connector="grpc"), "model"))
    out: dict[str, str] = {}
    for family in registry.collect():
        # prometheus_client drops "_total" from a counter family's name and adds it back to the samples
        name = f"{family.name}_total" if family.type == "counter" else family.name
        out[name] = family.type
    return out


def test_catalog_lists_exactly_what_the_code_registers() -> None:
    assert {name: kind for name, kind, _ in metrics_catalog.METRICS} == registered_series()


def test_queries_name_only_metrics_the_code_registers() -> None:
    exported = set()
    for name, kind in registered_series().items():
        exported |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else {name}
    for path in FILES:
        for expr in expressions(json.loads(path.read_text())):
            assert metric_names(expr) <= exported, f"{path.name}: {sorted(metric_names(expr) - exported)}"


def expressions(board: dict) -> list[str]:
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    return exprs + [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_queries_name_only_exported_metrics(path: Path) -> None:
    exported = metrics_catalog.series_names()
    board = json.loads(path.read_text())
    for expr in expressions(board):
        names = metric_names(expr)
        assert names, expr
        assert names <= exported, f"{path.name}: unknown metric(s) {sorted(names - exported)} in {expr}"


def test_every_exported_metric_is_on_a_dashboard() -> None:
    used = {n for p in FILES for e in expressions(json.loads(p.read_text())) for n in metric_names(e)}
    bases = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used} | used
    missing = [name for name, _, _ in metrics_catalog.METRICS if name not in bases]
    assert missing == []


def test_the_topics_the_issue_asks_for() -> None:
    titles = {p["title"] for f in FILES for p in json.loads(f.read_text())["panels"]}
    for title in ["Time to first token", "Inter-token latency", "Time per output token", "End-to-end latency",
                  "Tokens per second", "Waiting requests (queue depth)", "KV cache usage", "Prefix cache hit rate",
                  "Bytes per second", "Transfer latency", "Failures per second", "Decisions per second by plugin",
                  "Retries, resumes and failures per second", "Prefill and decode pods", "P:D ratio"]:
        assert title in titles


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_dashboards_are_well_formed(path: Path) -> None:
    board = json.loads(path.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert board["uid"] == path.stem and len(board["uid"]) <= 40
    cells = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels overlap at {x},{y}"
                cells.add((x, y))
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert all(t["legendFormat"] for t in p["targets"])
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "namespace", "model"]
