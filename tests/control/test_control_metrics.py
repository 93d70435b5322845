"""Prometheus: every metric the Grafana dashboard (grafana/hpcserve.json) queries is one that a live router
or control API exports, and docs/metrics.md lists exactly the metrics they export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from control_util import start
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported(text: str) -> set[str]:
    """The series names a scrape can hold, from each family's type (families without samples included)."""
    names = set()
    for fam in text_string_to_metric_families(text):
        names.update(fam.name + s for s in SUFFIXES.get(fam.type, ("",)))
    return names


def dashboard_metrics() -> set[str]:
    dash = json.loads((REPO / "grafana/hpcserve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs and all(t["datasource"]["uid"] == "${datasource}" for p in dash["panels"] for t in p["targets"])
    return {m for e in exprs for m in re.findall(r"\b(hpcserve_[a-z0-9_]+)", e)}


def test_dashboard_queries_only_exported_metrics_and_the_docs_list_them_all(deployment, tmp_path, monkeypatch):
    d, _ = start(deployment, tmp_path, monkeypatch)
    with httpx.Client(headers=d.headers, timeout=30) as c:
        for stream in (True, False):
            r = c.post(d.router + "/v1/completions", json={"model": "demo", "prompt": "hi", "max_tokens": 3,
                                                           "stream": stream})
            assert r.status_code == 200
    assert d.send("PUT", "/v1/workers/decode-1/rotation", json={"rotation": False}).json()["ok"] is True
    router = httpx.get(d.router + "/metrics", timeout=10).text
    control = httpx.get(d.control + "/metrics", timeout=10).text
    names = exported(router) | exported(control)
    queried = dashboard_metrics()
    assert not queried - names, f"the dashboard queries metrics nobody exports: {sorted(queried - names)}"
    # the control plane's numbers are the registry's
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(control) for s in fam.samples}
    assert samples[("hpcserve_workers", (("role", "decode"), ("state", "ready")))] == 2
    assert samples[("hpcserve_control_actions_total", (("action", "rotate_out"), ("ok", "true")))] == 1
    assert samples[("hpcserve_control_registry_up", ())] == 1
    # docs/metrics.md names every exported family (as scraped: counters with _total) and nothing else
    families = {f.name + ("_total" if f.type == "counter" else "")
                for text in (router, control) for f in text_string_to_metric_families(text)}
    documented = set(re.findall(r"`(hpcserve_[a-z0-9_]+)`", (REPO / "docs/metrics.md").read_text()))
    assert families <= documented, f"exported but not in docs/metrics.md: {sorted(families - documented)}"
    assert documented <= families | queried, f"documented but not exported: {sorted(documented - families)}"
