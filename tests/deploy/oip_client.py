"""Call a server through tritonclient's gRPC client (the Open Inference Protocol) and print what came back as JSON.

Run as its own process by test_oip.py: tritonclient registers protobuf package `inference` under another file
name, so it cannot share a process with the server's own copy of the protocol.

    python oip_client.py HOST:PORT MODEL IMAGES.npy
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main(url: str, model: str, images_path: str) -> dict:
    client = triton.InferenceServerClient(url=url)
    images = np.load(images_path)
    out: dict = {"live": client.is_server_live(), "ready": client.is_server_ready(),
                 "model_ready": client.is_model_ready(model), "unknown_ready": client.is_model_ready("nope")}
    meta = client.get_model_metadata(model, as_json=True)
    out["metadata"] = meta
    server = client.get_server_metadata(as_json=True)
    out["server"] = server

    def infer(array: np.ndarray, datatype: str) -> np.ndarray:
        tensor = triton.InferInput("images", list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        result = client.infer(model, [tensor], outputs=[triton.InferRequestedOutput("logits")], request_id="r-1")
        out.setdefault("ids", []).append(result.get_response().id)
        return result.as_numpy("logits")

    out["logits"] = infer(images, "FP32").tolist()
    out["logits_uint8"] = infer((images * 255).round().astype(np.uint8), "UINT8").tolist()
    errors = {}
    for name, call in {
        "bad_shape": lambda: infer(images[:, :, :8, :8].copy(), "FP32"),
        "out_of_range": lambda: infer(images * 3, "FP32"),
        "unknown_model": lambda: client.get_model_metadata("nope"),
    }.items():
        try:
            call()
            errors[name] = None
        except InferenceServerException as err:
            errors[name] = {"status": err.status(), "message": err.message()}
    out["errors"] = errors
    client.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
