"""The deploy/ files hold together: every YAML parses, promtool accepts the Prometheus config and rules (and the
rules' unit tests pass), kustomize renders the Kubernetes manifests with gRPC probes on the server's real
health names, the Dockerfiles copy files that exist and run as non-root with a gRPC health check, and that
health check script works against a real server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from deploy_helpers import DEPLOY, ROOT, free_port

from conceptlens.server.app import SERVICE_NAME, model_health_name

YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])


@pytest.fixture(scope="module")
def yaml(tools):
    tools.require(modules=("yaml",))
    import yaml

    return yaml


def docs(yaml, text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def promtool(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"promtool {' '.join(args)}:\n{run.stdout}\n{run.stderr}"
    return run


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(yaml, path):
    assert docs(yaml, path.read_text()), f"{path} holds no YAML document"


def test_dashboard_json():
    dash = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "conceptlens-overview"
    assert all(t["datasource"]["uid"] == "${datasource}" for p in dash["panels"] for t in p.get("targets", []))


@pytest.mark.slow  # among the costliest measured: left out of `make test-fast`
def test_promtool_checks_config_and_rules(tools):
    tools.require(exe=("promtool",))
    promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    out = promtool("check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")).stdout
    assert re.search(r"SUCCESS: \d+ rules found", out)
    promtool("test", "rules", str(Path(__file__).with_name("alerts_test.yml")))


def test_kubernetes_scrape_job_is_valid_prometheus_config(yaml, tools, tmp_path):
    tools.require(exe=("promtool",))
    cm = docs(yaml, (DEPLOY / "k8s" / "base" / "prometheus-scrape-configmap.yaml").read_text())[0]
    jobs = yaml.safe_load(cm["data"]["scrape-job.yml"])
    for job in jobs:  # Debian builds Prometheus without Kubernetes discovery; the relabelling is still checked
        assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
        job["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"scrape_configs": jobs}))
    promtool("check", "config", str(config))


def test_compose_stack(yaml):
    compose = docs(yaml, (DEPLOY / "docker-compose.yml").read_text())[0]
    assert set(compose["services"]) == {"conceptlens", "prometheus", "grafana"}
    build = compose["services"]["conceptlens"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists() or source == "../models", f"compose mounts missing {source}"
    prometheus = docs(yaml, (DEPLOY / "prometheus" / "prometheus.yml").read_text())[0]
    metrics_port = compose["services"]["conceptlens"]["command"][compose["services"]["conceptlens"]["command"]
                                                                  .index("--metrics-port") + 1]
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == [f"conceptlens:{metrics_port}"]


def render(yaml, overlay: str) -> dict[str, dict]:
    """`kubectl kustomize` output by kind (one object per kind here)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with built-in kustomize) is not installed; it is not installable from PyPI")
    run = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s" / overlay)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    objects: dict[str, dict] = {}
    for doc in docs(yaml, run.stdout):
        objects[doc["kind"] if doc["kind"] != "ConfigMap" else f"ConfigMap/{doc['metadata']['name']}"] = doc
    return objects


def test_kubernetes_base(yaml):
    k8s = render(yaml, "base")
    assert {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ServiceMonitor", "PersistentVolumeClaim", "ConfigMap/conceptlens-config"} <= set(k8s)
    deployment = k8s["Deployment"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051, probe  # native gRPC probes, not exec or TCP
    # The probed names are ones the server really registers with grpc.health.v1.
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["livenessProbe"]["grpc"]["service"] == ""
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # Every $(VAR) in the args comes from the ConfigMap.
    config = k8s["ConfigMap/conceptlens-config"]["data"]
    assert set(re.findall(r"\$\((\w+)\)", " ".join(container["args"]))) <= set(config)
    service = k8s["Service"]
    assert service["spec"]["clusterIP"] == "None"  # headless: clients balance per call across pods
    labels = pod["metadata"]["labels"]
    for selector in (service["spec"]["selector"], k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
                     deployment["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert k8s["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in k8s["ServiceMonitor"]["spec"]["endpoints"]} <= ports
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == config["METRICS_PORT"]


def test_kubernetes_gpu_overlay(yaml):
    k8s = render(yaml, "gpu")
    container = k8s["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("-cuda")
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME  # kept from the base
    assert k8s["ConfigMap/conceptlens-config"]["data"]["GRPC_PORT"] == "50051"  # merged, not replaced


@pytest.mark.slow
def test_kubernetes_front_overlay(yaml):
    """The shedding front as a sidecar: it takes the gRPC port, the server moves to loopback behind it and keeps
    its metrics reachable; both containers run the one image; every $(VAR) comes from the ConfigMap."""
    k8s = render(yaml, "front")
    containers = {c["name"]: c for c in k8s["Deployment"]["spec"]["template"]["spec"]["containers"]}
    server, sidecar = containers["conceptlens"], containers["front"]
    config = k8s["ConfigMap/conceptlens-config"]["data"]
    assert sidecar["command"] == ["conceptlens", "front"] and sidecar["image"] == server["image"]
    assert "--listen=0.0.0.0:$(GRPC_PORT)" in sidecar["args"]
    assert "--backend=127.0.0.1:$(BACKEND_PORT)" in sidecar["args"]
    assert {"--host=127.0.0.1", "--port=$(BACKEND_PORT)", "--metrics-host=0.0.0.0"} <= set(server["args"])
    assert config["GRPC_PORT"] == "50051" and config["BACKEND_PORT"] != config["GRPC_PORT"]
    for container in (server, sidecar):
        assert set(re.findall(r"\$\((\w+)\)", " ".join(container["args"]))) <= set(config)
    assert server["readinessProbe"]["grpc"]["port"] == 50051  # through the front, which passes health calls on
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in sidecar["volumeMounts"]} == {"/tmp"}  # nginx's --dir=/tmp/front
    # the front's refusals reach Prometheus: its metrics port is served, published and scraped beside the server's
    assert {"--metrics-host=0.0.0.0", "--metrics-port=$(FRONT_METRICS_PORT)"} <= set(sidecar["args"])
    assert {p["name"]: p["containerPort"] for p in sidecar["ports"]} == {"front-metrics": 9091}
    assert int(config["FRONT_METRICS_PORT"]) == 9091
    service_ports = {p["name"]: p["targetPort"] for p in k8s["Service"]["spec"]["ports"]}
    assert service_ports == {"grpc": "grpc", "metrics": "metrics", "front-metrics": "front-metrics"}
    assert [e["port"] for e in k8s["ServiceMonitor"]["spec"]["endpoints"]] == ["metrics", "front-metrics"]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile(name):
    text = (DEPLOY / name).read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", text, flags=re.M | re.I)
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    final = text[text.rfind("\nFROM"):]
    user = re.search(r"^USER\s+(\S+)", final, flags=re.M)
    assert user and user.group(1).split(":")[0] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK .*\n?.*healthcheck\.py", final, flags=re.M)
    assert re.search(r"^COPY --from=build ", final, flags=re.M)
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M):
        *sources, _dest = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{name} copies {source}, which does not exist"


@pytest.mark.slow
def test_healthcheck_script_against_the_served_process(cli_server):
    """The image's HEALTHCHECK command against `conceptlens serve` run with the image's flags."""
    script = DEPLOY / "healthcheck.py"
    server = cli_server

    def check(*args: str) -> int:
        return subprocess.run([sys.executable, str(script), *args], capture_output=True, timeout=60).returncode

    assert check(f"127.0.0.1:{server.port}") == 0
    assert check(f"127.0.0.1:{server.port}", model_health_name("small")) == 0
    assert check(f"127.0.0.1:{server.port}", model_health_name("nope")) == 1
    assert check(f"127.0.0.1:{free_port()}") == 1  # nothing listening
