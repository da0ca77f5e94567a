"""Bring your own model, end to end at small scale: a torchvision resnet18 and a timm ConvNeXt (random weights,
saved as a state dict the way a team would) are imported, dissected on generated Broden-layout data, exported
and served on loopback; Explain's Δs must equal re-running the imported torch model with the unit at its
baseline. resnet18's head is pooling + linear (exact last-layer path); ConvNeXt's has a norm after pooling
(exact hidden-layer path). Probes (PGD and ghost networks) of both answer with flip information; a CNN without
residual skips is refused ghost networks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from serving_helpers import config
from test_service import ablated_logit

from conceptlens.cli import main
from conceptlens.server.background import BackgroundServer
from conceptlens.training.data.broden import write_broden
from conceptlens.training.data.shapes import ShapesWorld
from conceptlens.training.run import load_run
from conceptlens_client import Client, ServiceError

pytestmark = pytest.mark.slow

SIZE = 64
CLASSES = ["cat", "dog", "bird"]
ATOL = 2e-4  # float32 logits of magnitude ~1: ONNX Runtime / torch agree to ~1e-6
EPS = 16 / 255


def _warmed(net: torch.nn.Module) -> torch.nn.Module:
    """Random weights with non-trivial BatchNorm statistics, as a trained network has."""
    torch.manual_seed(0)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(4, 3, SIZE, SIZE))
    return net.eval()


def _save_resnet18(path: Path) -> Path:
    net = _warmed(torchvision.models.resnet18(weights=None, num_classes=len(CLASSES)))
    torch.save({"epoch": 12, "state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, path)
    return path


def _save_convnext(path: Path) -> Path:
    net = _warmed(timm.create_model("convnext_atto", pretrained=False, num_classes=len(CLASSES)))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("byom")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    write_broden(ShapesWorld(16, size=SIZE, seed=4), root / "broden", val_fraction=0.0, progress=False)
    return root


def _import_dissect_export(root: Path, arch: str, weights: Path, name: str) -> tuple[Path, Path]:
    run, report, bundle = root / f"run_{name}", root / f"dissect_{name}", root / "models" / name / "1"
    assert main(["import", "--arch", arch, "--weights", str(weights), "--classes", str(root / "classes.txt"),
                 "--input-size", str(SIZE), "--out", str(run)]) == 0
    assert main(["dissect", "--model", str(run), "--data", str(root / "broden"), "--out", str(report),
                 "--batch-size", "8"]) == 0
    assert main(["export", "--run", str(run), "--dissection", str(report), "--out", str(bundle)]) == 0
    return run, bundle


@pytest.mark.parametrize(("arch", "save", "layer", "method"), [
    ("resnet18", _save_resnet18, "layer4", "exact-last-layer"),
    ("timm:convnext_atto", _save_convnext, "stages.3", "suffix-rerun"),
])
def test_imported_model_serves_exact_deltas(workspace, arch, save, layer, method, capsys):
    name = arch.replace("timm:", "").replace("_", "-")
    weights = save(workspace / f"{name}{'.pth' if arch == 'resnet18' else '.safetensors'}")
    run, bundle = _import_dissect_export(workspace, arch, weights, name)
    capsys.readouterr()
    meta = json.loads((run / "run.json").read_text())
    assert meta["architecture"] == arch and meta["classes"] == CLASSES and meta["layers"][-1] == layer
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [entry["name"] for entry in manifest["layers"]][-1] == layer
    assert any(u["label"] for u in manifest["layers"][-1]["units_info"])  # dissection labels made it in
    model = load_run(run)  # the imported model, independently of the server's copy
    x = np.random.default_rng(3).random((2, 3, SIZE, SIZE), dtype=np.float32)
    repo = workspace / "models"
    with BackgroundServer(config(repo)) as server, Client(f"127.0.0.1:{server.port}", timeout=120) as client:
        predicted = client.predict(list(x), name)
        with torch.no_grad():
            logits = model(torch.from_numpy(x))
        for i, pred in enumerate(predicted.predictions):
            assert pred.classes[0].label == CLASSES[int(logits[i].argmax())]
        explained = client.explain(list(x[:1]), name, layers=[layer], top_k_units=4, candidates=64)
        baselines = server.repository.resolve(name).baselines[layer]
        probes = [client.probe(list(x), name, attack=kind, epsilon=EPS, steps=2, seed=0, return_adversarial=True)
                  for kind in ("pgd", "ghost-ensemble")]  # both skips-eroding paths: torchvision and timm blocks
    for response in probes:
        _check_probe(response, x, logits)
    trace = explained.explanations[0].trace
    (traced,) = trace.layers
    assert traced.method == method and len(traced.units) == 4
    xt, c = torch.from_numpy(x[:1]), trace.target.index
    with torch.no_grad():
        f = float(model(xt)[0, c])
    for unit in traced.units:
        expected = f - ablated_logit(model, xt, layer, unit.unit, float(baselines[unit.unit]), c)
        assert unit.exact and unit.delta == pytest.approx(expected, abs=ATOL)


def _check_probe(response, x: np.ndarray, logits: torch.Tensor) -> None:
    """Every image answered with flip information that agrees with its clean and adversarial predictions, and an
    adversarial image within the L∞ budget."""
    assert len(response.results) == len(x)
    for image, clean_logits, r in zip(x, logits, response.results, strict=True):
        clean, adversarial = r.clean_prediction.classes[0], r.adversarial_prediction.classes[0]
        assert clean.label == CLASSES[int(clean_logits.argmax())]
        assert r.flipped == (adversarial.index != clean.index)
        adv = np.frombuffer(r.adversarial_image.data, "<f4").reshape(image.shape)
        assert np.abs(adv - image).max() <= EPS + 1e-5 and np.abs(adv - image).max() > 0


def test_a_cnn_without_residual_skips_is_probed_but_refused_ghost_networks(workspace):
    """ShuffleNetV2 (channel concat and shuffle, no sums): PGD probes work; a ghost-network probe is refused
    with INVALID_ARGUMENT saying why. Exported with the defaults: no detector, the run names no training data."""
    net = _warmed(torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=len(CLASSES)))
    torch.save(net.state_dict(), workspace / "shuffle.pth")
    run, bundle = workspace / "run_shuffle", workspace / "models_shuffle" / "shuffle" / "1"
    assert main(["import", "--arch", "shufflenet_v2_x0_5", "--weights", str(workspace / "shuffle.pth"),
                 "--classes", str(workspace / "classes.txt"), "--input-size", str(SIZE), "--out", str(run)]) == 0
    assert main(["export", "--run", str(run), "--out", str(bundle)]) == 0
    assert "adversarial_detector" not in json.loads((bundle / "manifest.json").read_text())
    x = np.random.default_rng(4).random((2, 3, SIZE, SIZE), dtype=np.float32)
    with torch.no_grad():
        logits = load_run(run)(torch.from_numpy(x))
    with BackgroundServer(config(bundle.parent.parent)) as server, \
            Client(f"127.0.0.1:{server.port}", timeout=120) as client:
        _check_probe(client.probe(list(x), "shuffle", attack="pgd", epsilon=EPS, steps=2, seed=0,
                                  return_adversarial=True), x, logits)
        with pytest.raises(ServiceError) as info:
            client.probe(list(x[:1]), "shuffle", attack="ghost-ensemble", epsilon=EPS, steps=2)
    assert info.value.code == "INVALID_ARGUMENT"
    assert "ghost-ensemble erodes residual skips, and shufflenet_v2_x0_5 has none" in info.value.message
