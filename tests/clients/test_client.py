"""The light client and its CLI against a real server: no torch on the client side, typed calls, JSON and text
output, heatmaps, one-line errors with non-zero exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptlens_client import Client, ServiceError, to_image
from conceptlens_client.cli import main
from conceptlens_client.heatmap import PANEL


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        path = d / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_client_package_does_not_import_torch():
    code = "import sys, conceptlens_client, conceptlens_client.cli; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_typed_client_accepts_paths_arrays_and_pil(server, pngs):
    with Client(f"127.0.0.1:{server.port}") as client:
        (m,) = client.models()
        size = m.input.size
        arr = np.zeros((3, size, size), np.uint8)
        response = client.predict([pngs[0], arr, Image.open(pngs[1]), pngs[1].read_bytes()], m.model, top_k=2)
        assert len(response.predictions) == 4 and all(len(p.classes) == 2 for p in response.predictions)
        exp = client.explain([pngs[0]], m.model, include_maps=True, top_k_units=3)
        assert len(exp.explanations[0].trace.layers[0].units) == 3
    with pytest.raises(TypeError, match="uint8 or float32"):
        to_image(np.zeros((3, 4, 4), np.int64))


def test_cli_models_predict_explain(server, pngs, capsys):
    target = f"127.0.0.1:{server.port}"
    assert main(["models", "--server", target]) == 0
    assert capsys.readouterr().out.startswith("small v1 small_cnn 4 classes; layers layer1(32)")
    assert main(["models", "--server", target, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["model"] == "small"
    assert main(["predict", *map(str, pngs), "--server", target, "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{pngs[0]}: ")
    assert main(["predict", str(pngs[0]), "--server", target, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["predictions"]) == 1


def test_cli_explain_heatmap(server, pngs, tmp_path, capsys):
    target = f"127.0.0.1:{server.port}"
    out = tmp_path / "heat.png"
    assert main(["explain", *map(str, pngs), "--server", target, "--units", "3", "--heatmap", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "of the score" in lines[0]
    for path in (out, tmp_path / "heat_1.png"):
        with Image.open(path) as img:
            assert img.size == (PANEL * 4, PANEL + 16)  # the image + 3 unit overlays
    assert main(["explain", str(pngs[0]), "--server", target, "--json", "--layers", "layer2,layer3",
                 "--depth", "2", "--units", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    layers = data["explanations"][0]["trace"]["layers"]
    assert [layer["layer"] for layer in layers] == ["layer2", "layer3"]
    assert len(layers[1]["units"][0]["contributors"]) == 2


def test_cli_errors_are_one_line_with_nonzero_exit(server, pngs, tmp_path, capsys):
    target = f"127.0.0.1:{server.port}"
    assert main(["predict", str(pngs[0]), "--server", target, "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NOT_FOUND: unknown model 'nope'" in err
    assert main(["explain", str(pngs[0]), "--server", target, "--layers", "fc9"]) == 2
    assert "unknown layer 'fc9'" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing.png"), "--server", target]) == 2
    assert "no such image" in capsys.readouterr().err
    bogus = tmp_path / "bogus.png"
    bogus.write_bytes(b"nope")
    assert main(["predict", str(bogus), "--server", target]) == 2
    assert "INVALID_ARGUMENT: images[0].encoded: not a decodable" in capsys.readouterr().err
    assert main(["models", "--server", "127.0.0.1:1", "--timeout", "2"]) == 1
    assert capsys.readouterr().err.startswith("conceptlens-client models: error: UNAVAILABLE")


def test_console_script_exit_code(server):
    exe = Path(sys.executable).with_name("conceptlens-client")
    done = subprocess.run([str(exe), "predict", "/nonexistent.png"], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "no such image" in done.stderr and "Traceback" not in done.stderr


def test_service_error_type():
    err = ServiceError("INVALID_ARGUMENT", "images: empty")
    assert str(err) == "INVALID_ARGUMENT: images: empty" and err.code == "INVALID_ARGUMENT"
