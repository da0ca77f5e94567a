"""Every metric the Grafana dashboard and the alert rules query is one the server (or its shedding front) exports,
and every family they export is on the dashboard: renaming a metric in server/metrics.py or server/front_metrics.py
fails here, not in production."""

from __future__ import annotations

import re

import pytest
from deploy_helpers import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"


@pytest.fixture(scope="module")
def q(tools):
    tools.require(modules=("yaml",))  # queries reads the alert rules with PyYAML
    import queries

    return queries


def test_dashboard_queries_exported_metrics(q):
    used = q.metric_names(q.dashboard_exprs(DASHBOARD))
    exported = q.exported_names()
    assert used, "the dashboard queries no conceptlens_ metric"
    assert used <= exported, f"dashboard queries metrics the server does not export: {sorted(used - exported)}"


def test_alerts_query_exported_metrics(q):
    exprs = q.rule_exprs(ALERTS)
    used = q.metric_names(exprs)
    assert used <= q.exported_names(), f"alerts query unknown metrics: {sorted(used - q.exported_names())}"
    recorded = {rule["record"] for rule in q.rules(ALERTS) if "record" in rule}
    referenced = {name for expr in exprs for name in q.RECORDED.findall(expr)}
    assert referenced <= recorded, f"alerts use recording rules nobody defines: {sorted(referenced - recorded)}"


def test_every_exported_family_is_on_the_dashboard(q):
    used = q.metric_names(q.dashboard_exprs(DASHBOARD))
    families = q.exported_families()
    shown = {f for f in families if any(re.fullmatch(re.escape(f) + r"(_bucket|_sum|_count)?", u) for u in used)}
    assert shown == families, f"exported but not on the dashboard: {sorted(families - shown)}"


def test_names_follow_prometheus_conventions(q):
    families = q.exported_families()
    assert all(name.startswith("conceptlens_") for name in families)
    assert all("duration" not in name or name.endswith("_seconds") for name in families)  # base unit in the name
    assert "conceptlens_requests_total" in families  # Counter("conceptlens_requests") is exposed with _total
    assert not any(name.endswith("_total_total") for name in q.exported_names())


def test_slo_bucket_bounds_exist(q):
    """The latency SLO reads one histogram bucket (le="0.25"): it must be one of the server's bucket bounds, or
    the SLO queries would silently return nothing."""
    from conceptlens.server.metrics import LATENCY_BUCKETS

    exprs = q.rule_exprs(ALERTS) + q.dashboard_exprs(DASHBOARD)
    bounds = {float(b) for expr in exprs for b in re.findall(r'le="([0-9.]+)"', expr)}
    assert bounds, "no SLO bucket referenced"
    assert bounds <= set(LATENCY_BUCKETS), f"not bucket bounds of conceptlens_request_duration_seconds: {bounds}"
