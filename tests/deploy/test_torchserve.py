"""Real TorchServe (Java) on loopback serving a ConceptLens bundle archived with torch-model-archiver and the
handler in handlers/torchserve_handler.py: the model registers through the management API, and the inference
API answers with our prediction (logits equal to the bundle's torch model) and influence trace."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from deploy_helpers import CLASSES, DEPLOY, LAYERS, ROOT, SIZE, free_port, wait_for
from PIL import Image

from conceptlens.handlers.bundle import load_bundle

pytestmark = pytest.mark.slow

BUNDLE_FILES = ("model.onnx", "weights.safetensors", "manifest.json")


def config_properties(template: Path, overrides: dict[str, str]) -> str:
    """deploy/torchserve/config.properties with some keys replaced (comments and other keys kept)."""
    lines, seen = [], set()
    for line in template.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and key in overrides:
            line, _ = f"{key}={overrides[key]}", seen.add(key)
        lines.append(line)
    lines += [f"{k}={v}" for k, v in overrides.items() if k not in seen]
    return "\n".join(lines) + "\n"


def http(method: str, url: str, body: bytes | None = None, timeout: float = 120) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/octet-stream"} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def torchserve(tools, bundle_dir, tmp_path_factory):
    """(inference URL, management URL, work dir) of a running TorchServe with the bundle registered."""
    tools.require(exe=("java",), modules=("ts", "model_archiver"))
    work: Path = tmp_path_factory.mktemp("torchserve")
    store = work / "model-store"
    store.mkdir()
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "torch-model-archiver"), "--model-name", "small", "--version", "1.0",
                    "--handler", str(ROOT / "handlers" / "torchserve_handler.py"),
                    "--extra-files", ",".join(str(bundle_dir / f) for f in BUNDLE_FILES),
                    "--export-path", str(store)], check=True, capture_output=True, timeout=300)
    assert (store / "small.mar").is_file()
    ports = {name: free_port() for name in ("inference", "management", "metrics")}
    config = work / "config.properties"
    config.write_text(config_properties(DEPLOY / "torchserve" / "config.properties", {
        **{f"{name}_address": f"http://127.0.0.1:{port}" for name, port in ports.items()},
        "model_store": str(store), "load_models": "",
        "vmargs": f"-Xmx512m -XX:+UseSerialGC -Djava.io.tmpdir={work / 'tmp'}"}))  # unpacked archives stay in work
    (work / "tmp").mkdir()
    # TorchServe keeps its pid file in the temp dir and its logs in the working directory: both stay in `work`,
    # so this instance cannot collide with another one on the machine.
    env = {**os.environ, "TMPDIR": str(work / "tmp"), "LOG_LOCATION": str(work / "logs"),
           "METRICS_LOCATION": str(work / "logs"), "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    log_path = work / "torchserve.out"
    log = log_path.open("w")
    proc = subprocess.Popen([str(bin_dir / "torchserve"), "--start", "--foreground", "--ncs", "--disable-token-auth",
                             "--ts-config", str(config), "--model-store", str(store)],
                            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    inference = f"http://127.0.0.1:{ports['inference']}"
    management = f"http://127.0.0.1:{ports['management']}"
    try:
        wait_for(lambda: proc.poll() is None and http("GET", f"{inference}/ping", timeout=5)[0] == 200, 120,
                 f"TorchServe did not answer /ping (log: {log_path})")
        # The management listener can come up after the inference one: wait for it too before registering.
        wait_for(lambda: http("GET", f"{management}/models", timeout=5)[0] == 200, 60,
                 f"TorchServe's management API did not answer (log: {log_path})")
        status, body = http("POST", f"{management}/models?url=small.mar&initial_workers=1&synchronous=true",
                            timeout=300)
        assert status == 200, f"register failed: {status} {body}\n{_tail(work)}"
        yield inference, management, work
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # java and its Python workers share the session we started
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


def _tail(work: Path) -> str:
    logs = [*sorted((work / "logs").glob("*.log")), work / "torchserve.out"]
    return "\n".join(f"--- {p.name}\n" + p.read_text()[-2000:] for p in logs if p.is_file())


def test_prediction_and_trace(torchserve, bundle_dir):
    inference, _, work = torchserve
    pixels = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    status, body = http("POST", f"{inference}/predictions/small", png(pixels))
    assert status == 200, f"{status} {body}\n{_tail(work)}"
    answer = json.loads(body)
    assert answer["model"] == "small" and answer["version"] == 1
    classes = answer["prediction"]["classes"]
    assert len(classes) == len(CLASSES) and {c["label"] for c in classes} == set(CLASSES)
    # Logits agree with the bundle's torch model on the same pixels (ONNX Runtime vs torch, float32).
    model = load_bundle(bundle_dir, verify_onnx=False).torch_model("cpu")
    with torch.no_grad():
        expected = model(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255)[0].numpy()
    got = np.array([c["logit"] for c in sorted(classes, key=lambda c: c["index"])])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert classes[0]["index"] == int(expected.argmax())
    trace = answer["trace"]
    assert trace["target"]["index"] == classes[0]["index"]
    assert [layer["layer"] for layer in trace["layers"]] == list(LAYERS)
    assert trace["layers"][-1]["method"] == "exact-last-layer"
    assert all(len(layer["units"]) == 5 for layer in trace["layers"])
    deltas = [u["delta"] for u in trace["layers"][-1]["units"]]
    assert deltas == sorted(deltas, reverse=True)
    assert trace["summary"].startswith(classes[0]["label"])


def test_explanations_endpoint_gives_the_trace(torchserve):
    inference, _, work = torchserve
    pixels = np.random.default_rng(4).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    status, body = http("POST", f"{inference}/explanations/small", png(pixels))
    assert status == 200, f"{status} {body}\n{_tail(work)}"
    explained = json.loads(body)
    status, body = http("POST", f"{inference}/predictions/small", png(pixels))
    predicted = json.loads(body)
    assert set(explained) == {"model", "version", "prediction", "trace"}
    assert [c["label"] for c in explained["prediction"]["classes"]] == \
        [c["label"] for c in predicted["prediction"]["classes"]]
    np.testing.assert_allclose([c["logit"] for c in explained["prediction"]["classes"]],
                               [c["logit"] for c in predicted["prediction"]["classes"]], atol=1e-5)
    assert [[u["unit"] for u in layer["units"]] for layer in explained["trace"]["layers"]] == \
        [[u["unit"] for u in layer["units"]] for layer in predicted["trace"]["layers"]]


def test_bad_image_is_a_400_with_the_reason(torchserve):
    inference, _, _ = torchserve
    status, body = http("POST", f"{inference}/predictions/small", b"definitely not an image")
    assert status == 400, body
    assert "not a decodable PNG or JPEG image" in body


def test_management_api_lists_a_ready_worker(torchserve):
    _, management, _ = torchserve
    status, body = http("GET", f"{management}/models/small")
    assert status == 200
    workers = json.loads(body)[0]["workers"]
    assert workers and all(w["status"] == "READY" for w in workers)


def test_handler_module_imports_without_torchserve():
    """The guard around TorchServe's base class: with `ts` unimportable the module still loads."""
    code = ("import sys; sys.modules['ts'] = None\n"
            "from conceptlens.handlers.torchserve_handler import ConceptLensHandler\n"
            "print(ConceptLensHandler.__mro__[1].__module__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "conceptlens.handlers.torchserve_handler"  # the stand-in, not ts'


def test_decode_image_resizes_and_refuses():
    from conceptlens.handlers.errors import InvalidInput
    from conceptlens.handlers.torchserve_handler import decode_image

    pixels = np.random.default_rng(0).integers(0, 256, (2 * SIZE, 2 * SIZE, 3), dtype=np.uint8)
    image = decode_image(bytearray(png(pixels)), SIZE, 3, field="request[0]")
    assert image.shape == (3, SIZE, SIZE) and image.dtype == np.float32 and 0 <= image.min() <= image.max() <= 1
    with pytest.raises(InvalidInput, match=r"request\[1\]: not a decodable PNG or JPEG image"):
        decode_image(b"GIF89a....", SIZE, 3, field="request[1]")
    with pytest.raises(InvalidInput, match="must be PNG or JPEG image bytes"):
        decode_image({"json": 1}, SIZE, 3, field="request[2]")


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (a decompression bomb's header, without the bomb)."""
    import struct
    import zlib

    data = bytearray(png(np.zeros((1, 1, 3), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_handler_decodes_with_the_servers_decoder_and_bomb_checks():
    """The TorchServe handler refuses oversized headers before decoding (it once decoded them), scales 16-bit
    PNGs, and gives the very pixels the gRPC server decodes from the same bytes."""
    from conceptlens.handlers.errors import InvalidInput
    from conceptlens.handlers.torchserve_handler import MAX_PIXELS, decode_image
    from conceptlens.server.decoding import ImageSpec, decode_encoded

    with pytest.raises(InvalidInput, match=rf"request\[0\]: header claims 4097x4096 pixels, over the {MAX_PIXELS}"):
        decode_image(_png_claiming(4097, 4096), SIZE, 3, field="request[0]")
    with pytest.raises(InvalidInput, match=r"request\[0\]: image too large"):
        decode_image(_png_claiming(30000, 30000), SIZE, 3, field="request[0]")
    grey16 = png(np.full((8, 8), 32768, np.uint16))
    np.testing.assert_allclose(decode_image(grey16, SIZE, 3, field="r"), 32768 / 65535, atol=1e-6)
    pixels = png(np.random.default_rng(3).integers(0, 256, (3 * SIZE, 2 * SIZE, 3), dtype=np.uint8))
    np.testing.assert_array_equal(decode_image(pixels, SIZE, 3, field="r"),
                                  decode_encoded(pixels, ImageSpec(SIZE, 3), max_pixels=MAX_PIXELS, field="r"))
