"""A real Prometheus (Debian's package) on loopback scrapes `conceptlens serve --metrics-port` (its own process); the
`conceptlens_` series are read back through Prometheus' HTTP API, the deploy alert rules load into it, and every
dashboard expression runs on its PromQL engine."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from deploy_helpers import DEPLOY, SIZE, free_port, wait_for

from conceptlens_client import Client

pytestmark = pytest.mark.slow

CALLS = {"Predict": 3, "Explain": 2}


def api(base: str, path: str, **params: str) -> dict:
    url = f"{base}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as err:  # Prometheus says why (e.g. a PromQL parse error)
        raise AssertionError(f"{path} {params}: HTTP {err.code}: {err.read().decode()[:500]}") from None
    assert body["status"] == "success", body
    return body["data"]


def query(base: str, expr: str) -> list[dict]:
    return api(base, "query", query=expr)["result"]


@pytest.fixture(scope="module")
def prometheus(cli_server, tools, tmp_path_factory):
    """Base URL of a Prometheus scraping the served process every second, with deploy/prometheus/alerts.yml loaded."""
    tools.require(exe=("prometheus", "promtool"), modules=("yaml",))
    work: Path = tmp_path_factory.mktemp("prometheus")
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", work / "alerts.yml")
    config = work / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "rule_files: [alerts.yml]\n"
        "scrape_configs:\n"
        "  - job_name: conceptlens\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{cli_server.metrics_port}']}}]\n")
    subprocess.run(["promtool", "check", "config", str(config)], check=True, capture_output=True)
    port = free_port()
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200, 60,
                 "Prometheus did not get ready")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture(scope="module")
def traffic(cli_server, prometheus):
    """Real calls, so requests, latency, batching, inference time and concept hits have samples. One round goes
    in before Prometheus scrapes it and the rest after: a series' first sample is no increase to `rate()`."""
    images = list(np.random.default_rng(1).random((2, 3, SIZE, SIZE), dtype=np.float32))
    with Client(f"127.0.0.1:{cli_server.port}", timeout=120) as client:
        for round_ in range(2):
            for _ in range(CALLS["Predict"] - 1 if round_ else 1):
                client.predict(images[:1], "small")
            for _ in range(CALLS["Explain"] - 1 if round_ else 1):
                client.explain(images, "small", top_k_units=10)  # some top units carry concepts
            if round_ == 0:
                wait_for(lambda: len(query(prometheus, 'conceptlens_requests_total{method=~"Predict|Explain"}')) == 2,
                         60, "the first calls were not scraped")
    return CALLS


def test_series_read_back_through_the_http_api(prometheus, traffic):
    def scraped():
        rows = query(prometheus, 'conceptlens_requests_total{job="conceptlens", model="small", code="OK"}')
        counts = {row["metric"]["method"]: float(row["value"][1]) for row in rows}
        return counts if all(counts.get(m, 0) >= n for m, n in traffic.items()) else None

    counts = wait_for(scraped, 60, "conceptlens_requests_total did not reach Prometheus")
    assert counts["Predict"] == traffic["Predict"] and counts["Explain"] == traffic["Explain"]
    names = set(api(prometheus, "label/__name__/values"))
    for name in ("conceptlens_request_duration_seconds_bucket", "conceptlens_batch_size_bucket",
                 "conceptlens_inference_duration_seconds_count", "conceptlens_queue_depth",
                 "conceptlens_model_loaded", "conceptlens_model_version", "conceptlens_concept_hits_total"):
        assert name in names, f"{name} not scraped; got {sorted(n for n in names if n.startswith('conceptlens'))}"
    version = query(prometheus, 'conceptlens_model_version{model="small"}')
    assert [float(v["value"][1]) for v in version] == [1.0]
    assert float(query(prometheus, 'up{job="conceptlens"}')[0]["value"][1]) == 1.0


def test_alert_rules_load_into_prometheus(prometheus):
    groups = api(prometheus, "rules")["groups"]
    alerts = {rule["name"] for group in groups for rule in group["rules"] if rule["type"] == "alerting"}
    assert {"ConceptLensHighErrorRate", "ConceptLensLatencyBudgetBurnFast", "ConceptLensQueueRejecting",
            "ConceptLensModelLoadFailed", "ConceptLensAdversarialFlagSpike", "ConceptLensProbeFlipSpike"} <= alerts
    assert all(rule["health"] != "err" for group in groups for rule in group["rules"]), groups


def test_dashboard_queries_run_on_real_data(prometheus, traffic):
    import queries

    exprs = [queries.for_prometheus(e) for e in queries.dashboard_exprs(DEPLOY / "grafana" / "dashboard.json",
                                                                               variables=False)]
    wait_for(lambda: query(prometheus, "sum(rate(conceptlens_requests_total[5m])) > 0"), 60,
             "no request rate yet")
    results = {expr: query(prometheus, expr) for expr in exprs}  # each raises on a PromQL error
    traffic_panel = next(e for e in exprs if e.startswith("sum by (method) (rate(conceptlens_requests_total"))
    assert {row["metric"]["method"] for row in results[traffic_panel]} >= set(traffic)
    latency = next(e for e in exprs if "histogram_quantile(0.99" in e and "request_duration" in e)
    values = [float(row["value"][1]) for row in results[latency]]
    assert values and all(0 < v < 30 for v in values)
