"""Reply-size check before work: an Explain or Probe whose reply would exceed the gRPC message limit is refused
with INVALID_ARGUMENT naming the fields that make it large, before any image is decoded or traced (the transport
would otherwise refuse the reply after all the work was done). The estimates are upper bounds of the encoded size
of what the request asks for (see docs/design.md, serving under overload)."""

from __future__ import annotations

from conceptlens.handlers.errors import InvalidInput

UNIT_BYTES = 160  # one UnitInfluence without its map: ten scalar fields, layer and concept names, framing
IMAGE_BYTES = 1024  # per explained image: prediction classes, trace header, summary sentence
CLASS_BYTES = 64  # one ClassScore with its label


def layer_side(runtime, layer: str) -> int:
    """The spatial side of `layer`'s maps from the ONNX output's static shape; the input size when unknown."""
    for output in runtime.onnx.session.get_outputs():
        if output.name == layer and len(output.shape) == 4:
            h, w = output.shape[2], output.shape[3]
            if isinstance(h, int) and isinstance(w, int):
                return max(h, w)
    return runtime.input_size


def units_per_image(n_layers: int, top_k_units: int, depth: int) -> int:
    """Units one trace reports: top_k_units per layer, and top_k_units contributors of each linked unit for
    depth - 1 levels below the deepest (as handlers/trace.py builds them)."""
    return n_layers * top_k_units + sum(top_k_units ** d for d in range(2, depth + 1))


def check_explain(runtime, images: int, layers: list[str], top_k_units: int, depth: int, include_maps: bool,
                  map_size: int, top_k_classes: int, limit: int) -> None:
    """Refuse an Explain whose reply could exceed `limit` bytes."""
    units = units_per_image(len(layers), top_k_units, depth)
    side = map_size if map_size > 0 else max(layer_side(runtime, layer) for layer in layers)
    per_unit = UNIT_BYTES + (4 * side * side + 16 if include_maps else 0)
    per_image = IMAGE_BYTES + CLASS_BYTES * (top_k_classes + 1) + units * per_unit
    total = images * per_image
    if total <= limit:
        return
    if include_maps:
        fields = (f"images ({images}) x units per image ({units}: layers x top_k_units, plus links for depth) x "
                  f"include_maps with map_size {side}x{side} ({4 * side * side} bytes each)")
        advice = "send fewer images, lower top_k_units, depth or map_size, or set include_maps=false"
    else:
        fields = f"images ({images}) x units per image ({units}: layers x top_k_units, plus links for depth)"
        advice = "send fewer images or lower top_k_units or depth"
    raise InvalidInput("images", f"the reply would be about {total} bytes, over the server's message limit of {limit}: "
                       f"{fields}; {advice}")


def check_probe(runtime, images: int, return_adversarial: bool, top_k_units: int, n_layers: int, limit: int) -> None:
    """Refuse a Probe whose reply could exceed `limit` bytes: with `return_adversarial` each result carries the
    adversarial image (float32 tensor and PNG) and its perturbation map."""
    pixels = runtime.input_size * runtime.input_size
    per_image = 2 * IMAGE_BYTES + 4 * n_layers * top_k_units * UNIT_BYTES
    if return_adversarial:
        per_image += 4 * runtime.channels * pixels + runtime.channels * pixels + 1024 + 4 * pixels
    total = images * per_image
    if total > limit:
        raise InvalidInput("images", f"the reply would be about {total} bytes, over the server's message limit of "
                           f"{limit}: images ({images}) x return_adversarial ({runtime.input_size}x"
                           f"{runtime.input_size} image, PNG and perturbation map each); send fewer images or set "
                           "return_adversarial=false")
