"""Probe on a real server over loopback with the real client, on the trained ShapesWorld small_cnn exported as a
bundle, probes running in a worker process as served: the probe's PGD is the library's (robust accuracy equals
`training.evaluate`), minimal ε is verified per image with the library attack, the deadline stops the attack
between steps, caps name themselves, Square runs through ONNX alone (the bundle's torch weights are poisoned with
NaN), a killed worker fails only its probe and is replaced, the in-process mode answers the same, and no worker
process outlives the server."""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from serving_helpers import config

from conceptlens.handlers.attacks import PGD
from conceptlens.handlers.bundle import WEIGHTS_FILE, sha256_file
from conceptlens.handlers.zoo import arch_spec, resolve_layer, save_weights
from conceptlens.server.background import BackgroundServer
from conceptlens.server.config import Limits
from conceptlens.training.evaluate import evaluate
from conceptlens.training.export import export_bundle
from conceptlens_client import Client
from conceptlens_client.cli import main as client_main
from conceptlens_client.client import ServiceError

# Real servers with probe worker processes (each imports torch and loads the bundles): the costliest module of the
# suite, left out of `make test-fast`; tests/handlers/test_probe_unit.py tests probe() directly there.
pytestmark = pytest.mark.slow

LIMITS = Limits(max_images=8, max_probe_images=8, max_probe_work=30_000, max_message_bytes=4 << 20)
LAYERS = ["layer1", "layer2", "layer3"]
CONCEPTS = ["wheel", "window", "leaf", "sail", "red", "stripes"]


def _dissection(classes: list[str], units: dict[str, int]) -> dict:
    """A made-up dissection over the model's own classes: every third unit a detector, non-zero baselines."""
    layers = {layer: {"units": [{"label": CONCEPTS[k % 6] if k % 3 == 0 else "",
                                 "category": "part" if k % 3 == 0 else "", "iou": 0.1 if k % 3 == 0 else 0.0,
                                 "detector": k % 3 == 0, "baseline": 0.01 * (k % 5)} for k in range(n)]}
              for layer, n in units.items()}
    cooc = {c: {cls: (0.9 if (i + j) % 3 == 0 else 0.1) for j, cls in enumerate(classes)}
            for i, c in enumerate(CONCEPTS)}
    return {"layers": layers, "cooccurrence": cooc}


def _export(model, out, name: str):
    return export_bundle(model, out, name=name, version=1, layers=LAYERS,
                         dissection=_dissection(list(model.classes), {"layer1": 32, "layer2": 64, "layer3": 128}))


@pytest.fixture(scope="module")
def bundles(shapes_model, shapes_model_b, tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_bundles")
    return _export(shapes_model, root / "shapes" / "1", "shapes"), _export(shapes_model_b, root / "other" / "1",
                                                                            "other")


@pytest.fixture(scope="module")
def served(bundles, tmp_path_factory):
    """A server on a repository holding `shapes` (the probed model) and `other` (an ensemble member)."""
    repo = tmp_path_factory.mktemp("probe_repo")
    for bundle in bundles:
        shutil.copytree(bundle, repo / bundle.parent.name / "1")
    with BackgroundServer(config(repo, limits=LIMITS, probe_processes=1)) as server, \
            Client(f"127.0.0.1:{server.port}", timeout=120) as client:
        yield server, client


def _arrays(images: torch.Tensor) -> list[np.ndarray]:
    return [im.numpy().astype(np.float32) for im in images]


def test_probe_pgd_robust_accuracy_equals_evaluate(served, shapes_model, shapes_batch):
    _, client = served
    x, y = shapes_batch[0][:8], shapes_batch[1][:8]
    eps, steps = 5 / 255, 5
    response = client.probe(_arrays(x), "shapes", attack="pgd", epsilon=eps, steps=steps, random_start=False)
    adv_pred = torch.tensor([r.adversarial_prediction.classes[0].index for r in response.results])
    probe_acc = (adv_pred == y).float().mean().item()
    dataset = list(zip(x, y.tolist(), strict=True))
    report = evaluate(shapes_model, dataset, eps=eps, steps=steps, batch_size=8, random_start=False)
    assert probe_acc == report["robust_accuracy"]
    assert 0 < probe_acc < 1  # the setting separates robust from fragile images, so equality means something
    # per image too: the library PGD on the clean predictions flips exactly the images the probe flipped
    with torch.no_grad():
        clean = shapes_model(x).argmax(1)
    lib = PGD(shapes_model, eps=eps, steps=steps, random_start=False)(x, clean)
    assert [r.flipped for r in response.results] == lib.success.tolist()
    assert all(r.HasField("clean_trace") and r.adversarial_trace.layers for r in response.results)


def test_minimal_epsilon_flips_at_eps_and_not_one_tolerance_below(served, shapes_model, shapes_batch):
    _, client = served
    x = shapes_batch[0][8:12]
    lo, hi, tol, steps = 0.0, 16 / 255, 1 / 255, 5
    response = client.probe(_arrays(x), "shapes", attack="pgd", epsilon_range=(lo, hi), tolerance=tol, steps=steps,
                            layers=["layer2", "layer3"], top_k_units=3)
    with torch.no_grad():
        clean = shapes_model(x).argmax(1)
    flipped = 0
    for i, r in enumerate(response.results):
        assert [u.layer for u in r.changed_units] == ["layer2"] * 3 + ["layer3"] * 3
        if not r.flipped:
            assert not r.HasField("min_flip_epsilon")
            continue
        flipped += 1
        e = torch.tensor([r.min_flip_epsilon])
        assert r.confidence_drop > 0
        assert PGD(shapes_model, eps=e, steps=steps, random_start=False)(x[i : i + 1], clean[i : i + 1]).success
        if (e - tol).item() >= lo:
            below = PGD(shapes_model, eps=e - tol, steps=steps, random_start=False)(x[i : i + 1], clean[i : i + 1])
            assert not below.success, f"image {i} already flips at {(e - tol).item()}"
    assert flipped >= 2


def _probe_count(server, outcome: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "conceptlens_probes_total", {"model": "shapes", "kind": "pgd", "outcome": outcome})
    return value or 0.0


def test_probe_past_its_deadline_stops_promptly(served, shapes_batch):
    server, client = served
    before = _probe_count(server, "deadline_exceeded")
    deadline = 0.6
    started = time.monotonic()
    with pytest.raises(ServiceError) as info:  # a long search: many seconds of work if nothing stopped it
        client.probe(_arrays(shapes_batch[0][:8]), "shapes", attack="pgd", epsilon_range=(0, 0.5), steps=200,
                     tolerance=1 / 255, timeout=deadline)
    assert info.value.code == "DEADLINE_EXCEEDED"
    while _probe_count(server, "deadline_exceeded") == before and time.monotonic() - started < deadline + 5:
        time.sleep(0.01)
    stopped = time.monotonic() - started
    assert stopped < deadline + 1.0, f"the server worked on for {stopped - deadline:.2f}s past the deadline"
    # the probe worker is free again: a small probe answers at once
    quick = time.monotonic()
    client.probe(_arrays(shapes_batch[0][:1]), "shapes", attack="fgsm", epsilon=2 / 255)
    assert time.monotonic() - quick < 2.0


CAPS = [
    ({"steps": 201}, "RESOURCE_EXHAUSTED", "max_probe_steps=200"),
    ({"restarts": 6, "epsilon": 0.01}, "RESOURCE_EXHAUSTED", "max_probe_restarts=5"),
    ({"epsilon": 0.9}, "INVALID_ARGUMENT", "max_probe_epsilon=0.5"),
    ({"epsilon_range": (0.0, 0.6)}, "INVALID_ARGUMENT", "max_probe_epsilon=0.5"),
    ({"attack": "square", "steps": 6000}, "RESOURCE_EXHAUSTED", "max_probe_queries=5000"),
    ({"epsilon_range": (0.0, 0.5), "tolerance": 1e-4, "steps": 200, "images": 8}, "RESOURCE_EXHAUSTED",
     "max_probe_work=30000"),
    ({"images": 9}, "INVALID_ARGUMENT", "over the server's limit of 8"),
    ({"epsilon": 0.0}, "INVALID_ARGUMENT", "attack.epsilon: required"),
    ({"attack": "square", "norm": "l2"}, "INVALID_ARGUMENT", "attack.norm"),
    ({"target_class": "unicorn"}, "INVALID_ARGUMENT", "attack.target_class: unknown class 'unicorn'"),
    ({"ensemble_models": ["other"]}, "INVALID_ARGUMENT", "only GHOST_ENSEMBLE"),
    ({"attack": "ghost-ensemble", "ensemble_models": ["nope"]}, "NOT_FOUND", "unknown model 'nope'"),
]


@pytest.mark.parametrize(("options", "code", "message"), CAPS, ids=[c[2] for c in CAPS])
def test_over_cap_and_bad_probes_name_the_cap_or_field(served, shapes_batch, options, code, message):
    _, client = served
    options = {"attack": "pgd", "epsilon": 0.03, **options}
    images = _arrays(shapes_batch[0][: options.pop("images", 1)])
    with pytest.raises(ServiceError) as info:
        client.probe(images, "shapes", **options)
    assert info.value.code == code, info.value
    assert message in info.value.message, info.value.message


@pytest.mark.parametrize("options", [
    {"attack": "fgsm", "epsilon": 8 / 255},
    {"attack": "pgd", "epsilon": 1.0, "norm": "l2", "steps": 5, "restarts": 2},
    {"attack": "mifgsm", "epsilon": 24 / 255, "steps": 10, "target_class": "boat"},
    {"attack": "ghost-ensemble", "epsilon": 16 / 255, "steps": 10, "ensemble_models": ["other"]},
], ids=lambda o: o["attack"])
def test_every_gradient_kind_returns_a_bounded_adversarial_image(served, shapes_batch, options):
    _, client = served
    x = shapes_batch[0][:2]
    response = client.probe(_arrays(x), "shapes", return_adversarial=True, **options)
    for image, r in zip(x, response.results, strict=True):
        adv = np.frombuffer(r.adversarial_image.data, "<f4").reshape(tuple(r.adversarial_image.shape))
        delta = adv - image.numpy()
        bound = np.abs(delta).max() if options.get("norm") != "l2" else np.linalg.norm(delta.ravel())
        assert bound <= options["epsilon"] + 1e-5
        assert Image.open(io.BytesIO(r.adversarial_png)).size == (32, 32)
        assert (r.perturbation.height, r.perturbation.width) == (32, 32)
        assert np.allclose(np.array(r.perturbation.values).reshape(32, 32), np.abs(delta).max(0), atol=1e-6)
        if "target_class" in options and r.flipped:
            assert r.adversarial_prediction.classes[0].label == "boat"
    assert any(r.flipped for r in response.results)


def _poison_torch_weights(model, bundle: Path) -> None:
    """Rewrite the bundle's weights with NaN everywhere but the head (the closed-form last-layer trace uses it,
    not torch), and its manifest's hash to match: any torch forward pass now gives NaN logits."""
    poisoned = copy.deepcopy(model)
    kept = {id(p) for p in resolve_layer(poisoned, arch_spec("small_cnn").head).parameters()}
    with torch.no_grad():
        for p in poisoned.parameters():
            if id(p) not in kept:
                p.fill_(float("nan"))
    save_weights(poisoned, bundle / WEIGHTS_FILE)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][WEIGHTS_FILE] = sha256_file(bundle / WEIGHTS_FILE)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_square_needs_only_the_onnx_session(bundles, shapes_model, tmp_path, shapes_batch):
    repo = tmp_path / "repo"
    shutil.copytree(bundles[0], repo / "shapes" / "1")
    _poison_torch_weights(shapes_model, repo / "shapes" / "1")
    # the worker process loads the poisoned file too (verify_onnx would refuse the bundle: torch gives NaN)
    with BackgroundServer(config(repo, limits=LIMITS, verify_onnx=False)) as server, \
            Client(f"127.0.0.1:{server.port}") as client:
        x = shapes_batch[0][:4]
        response = client.probe(_arrays(x), "shapes", attack="square", epsilon=32 / 255, steps=300,
                                return_adversarial=True)
        # the poison reached the worker: a gradient attack there sees NaN logits
        fgsm = client.probe(_arrays(x[:1]), "shapes", attack="fgsm", epsilon=8 / 255)
        assert np.isnan(fgsm.results[0].adversarial_prediction.classes[0].logit)
        assert any(r.flipped for r in response.results)
        for image, r in zip(x, response.results, strict=True):
            adv = np.frombuffer(r.adversarial_image.data, "<f4").reshape(3, 32, 32)
            assert np.abs(adv - image.numpy()).max() <= 32 / 255 + 1e-6
            assert np.isfinite(r.adversarial_prediction.classes[0].logit)
            assert r.flipped == (r.adversarial_prediction.classes[0].index != r.clean_prediction.classes[0].index)
            assert len(r.changed_units) == 5 and r.adversarial_trace.layers[0].method == "exact-last-layer"
            assert all(np.isfinite([u.clean_delta, u.adversarial_delta]).all() for u in r.changed_units)


def test_cli_probe_searches_and_saves_the_adversarial_image(served, shapes_batch, tmp_path, capsys):
    server, _ = served
    path = tmp_path / "x.png"
    Image.fromarray((shapes_batch[0][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    adv = tmp_path / "adv.png"
    code = client_main(["probe", str(path), "--server", f"127.0.0.1:{server.port}", "--model", "shapes",
                        "--attack", "pgd", "--eps-range", "0:0.1", "--steps", "5", "--save-adv", str(adv), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"][0]["flipped"] and 0 < out["results"][0]["minFlipEpsilon"] <= 0.1
    assert Image.open(adv).size == (32, 32)
    with pytest.raises(SystemExit):  # argparse refuses a reversed range before any call
        client_main(["probe", str(path), "--server", f"127.0.0.1:{server.port}", "--eps-range", "0.2:0.1"])


def test_probe_metrics_count_kinds_outcomes_and_duration(served):
    server, _ = served
    registry = server.metrics.registry
    assert _probe_count(server, "flipped") > 0 and _probe_count(server, "robust") > 0
    assert registry.get_sample_value("conceptlens_probe_duration_seconds_count",
                                     {"model": "shapes", "kind": "pgd"}) > 0
    assert registry.get_sample_value("conceptlens_probe_flip_epsilon_count", {"model": "shapes"}) > 0
    assert registry.get_sample_value("conceptlens_probes_total", {"model": "shapes", "kind": "pgd",
                                                                  "outcome": "resource_exhausted"}) > 0



def test_a_killed_worker_fails_its_probe_with_unavailable_and_is_replaced(served, shapes_batch):
    server, client = served
    workers = server.probe_workers
    client.probe(_arrays(shapes_batch[0][:1]), "shapes", attack="fgsm", epsilon=2 / 255)  # the worker is up
    [pid] = workers.pids()
    failure: list[ServiceError] = []

    def long_probe() -> None:  # many seconds of work: a search with 200-step PGD
        try:
            client.probe(_arrays(shapes_batch[0][:8]), "shapes", attack="pgd", epsilon_range=(0, 0.5), steps=200,
                         timeout=60)
        except ServiceError as err:
            failure.append(err)

    caller = threading.Thread(target=long_probe)
    caller.start()
    started = time.monotonic()
    while workers.busy == 0 and time.monotonic() - started < 10:
        time.sleep(0.01)
    time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    caller.join(30)
    assert failure and failure[0].code == "UNAVAILABLE", failure
    assert "probe worker process" in failure[0].message and "SIGKILL" in failure[0].message, failure[0].message
    # a new worker answers the next probe; the server never stopped serving
    response = client.probe(_arrays(shapes_batch[0][:2]), "shapes", attack="fgsm", epsilon=8 / 255)
    assert len(response.results) == 2
    assert pid not in workers.pids() and len(workers.pids()) == 1
    # an idle worker killed between probes is replaced before the next one runs
    [idle] = workers.pids()
    os.kill(idle, signal.SIGKILL)
    while _running(idle):
        time.sleep(0.01)
    assert len(client.probe(_arrays(shapes_batch[0][:1]), "shapes", attack="fgsm", epsilon=8 / 255).results) == 1


def test_in_process_mode_answers_like_the_worker(served, shapes_batch):
    server, client = served
    x = _arrays(shapes_batch[0][:4])
    options = {"attack": "pgd", "epsilon": 4 / 255, "steps": 5, "random_start": False, "return_adversarial": True}
    expected = client.probe(x, "shapes", **options)
    with BackgroundServer(replace(server.config, probe_processes=0)) as local, \
            Client(f"127.0.0.1:{local.port}", timeout=120) as local_client:
        assert local.probe_workers.pids() == []
        got = local_client.probe(x, "shapes", **options)
    for a, b in zip(expected.results, got.results, strict=True):
        assert a.flipped == b.flipped
        assert a.adversarial_prediction.classes[0].index == b.adversarial_prediction.classes[0].index
        adv_a = np.frombuffer(a.adversarial_image.data, "<f4")
        adv_b = np.frombuffer(b.adversarial_image.data, "<f4")
        assert np.allclose(adv_a, adv_b, atol=1e-5)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _running(pid: int) -> bool:
    """Whether any thread of `pid` has yet to exit (a zombie has exited: an init that does not reap leaves it
    listed; a killed process's main thread turns zombie before its other threads are gone)."""
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] not in "ZX":
                return True
        except OSError:
            continue
    return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_no_worker_process_outlives_sigterm(bundles, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(bundles[0], repo / "shapes" / "1")
    cmd = [sys.executable, "-m", "conceptlens", "serve", "--models", str(repo), "--host", "127.0.0.1", "--port", "0",
           "--poll", "0", "--grace", "2", "--no-verify-onnx"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "listening on port" in proc.stdout.readline()
        children = _children(proc.pid)  # the probe worker (and multiprocessing's resource tracker)
        assert children
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while any(map(_running, children)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in children if _running(pid)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
