"""What the deploy files ask Prometheus for: every PromQL expression of the Grafana dashboard and the alert rules,
the `conceptlens_` metric names they use, and the sample names the server and its shedding front really export."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from conceptlens.server.front import DEFAULT_LIMITS
from conceptlens.server.front_metrics import FrontCollector, RefusalLog
from conceptlens.server.metrics import Metrics

METRIC = re.compile(r"\bconceptlens_[a-zA-Z0-9_]+")
RECORDED = re.compile(r"\bconceptlens:[a-zA-Z0-9_:]+")
# Grafana's own variables, replaced by what Grafana would send so the expressions run on a plain Prometheus.
GRAFANA_VARS = {"$__rate_interval": "5m", "$model": ".*"}


def dashboard_exprs(path: Path, *, variables: bool = True) -> list[str]:
    """Panel expressions, plus (with `variables`) the template variables' Grafana queries (not PromQL)."""
    dash = json.loads(path.read_text())
    exprs = [t["expr"] for panel in dash["panels"] for t in panel.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []) if variables else []:
        query = var.get("query")
        if var.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def rules(path: Path) -> list[dict]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def rule_exprs(path: Path) -> list[str]:
    return [rule["expr"] for rule in rules(path)]


def for_prometheus(expr: str) -> str:
    """A dashboard expression as Grafana would send it."""
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def metric_names(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC.findall(expr)}


def exported_names() -> set[str]:
    """Sample names the server's registry exposes, read back after touching every collector once."""
    metrics = Metrics()
    for collector in vars(metrics).values():
        if not isinstance(collector, Counter | Gauge | Histogram):
            continue
        child = collector.labels(*["x"] * len(collector._labelnames)) if collector._labelnames else collector
        if isinstance(collector, Counter):
            child.inc()
        elif isinstance(collector, Gauge):
            child.set(1)
        else:
            child.observe(0.01)
    return {sample.name for family in [*metrics.registry.collect(), *_front_families()] for sample in family.samples}


def exported_families() -> set[str]:
    """Metric family names as Prometheus sees them (counters carry `_total`)."""
    out = set()
    for family in [*Metrics().registry.collect(), *_front_families()]:
        out.add(family.name + "_total" if family.type == "counter" else family.name)
    return out


def _front_families() -> list:
    """What `conceptlens front --metrics-port` exposes (its collector reads the refusal log of an empty folder)."""
    with tempfile.TemporaryDirectory() as directory:
        registry = CollectorRegistry()
        registry.register(FrontCollector(RefusalLog(Path(directory)), DEFAULT_LIMITS))
        return list(registry.collect())
