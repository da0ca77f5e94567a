"""Request validation: pure functions over plain values, each raising `InvalidInput(field, problem)` (or
`UnknownName` for names the server does not serve, which maps to NOT_FOUND). Tested without a server.

Each returns the value to use, with the documented default applied (0 means "default" in proto3).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from conceptlens.handlers.errors import InvalidInput, QueueFull, UnknownName

DEFAULT_TOP_K = 5
DEFAULT_CANDIDATES = 32
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def model_name(name: str) -> str:
    """A model name as it appears in the repository (a directory name)."""
    if not name:
        raise InvalidInput("model", "required; call ListModels for the served names")
    if not _MODEL_NAME.match(name):
        raise InvalidInput("model", f"{name[:64]!r} is not a valid model name (letters, digits, _ . -)")
    return name


def version(value: int) -> int:
    """0 = latest; otherwise a positive version number."""
    if value < 0:
        raise InvalidInput("version", f"must be >= 0 (0 = latest), got {value}")
    return value


def image_count(n: int, cap: int, field: str = "images") -> int:
    """1..cap images per request."""
    if n == 0:
        raise InvalidInput(field, "empty: send at least one image")
    if n > cap:
        raise InvalidInput(field, f"{n} images, over the server's limit of {cap} per request")
    return n


def top_k(k: int, available: int, field: str) -> int:
    """0 = min(5, available); otherwise 1..available."""
    if k == 0:
        return min(DEFAULT_TOP_K, available)
    if k < 0 or k > available:
        raise InvalidInput(field, f"must be in 1..{available}, got {k}")
    return k


def layers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """Requested layers in network order (the order of `available`); empty = the deepest layer."""
    if not available:
        raise InvalidInput("layers", "this model has no traced layers")
    if not requested:
        return [available[-1]]
    seen = set()
    for name in requested:
        if name not in available:
            raise UnknownName("layer", name, available)
        if name in seen:
            raise InvalidInput("layers", f"{name!r} requested twice")
        seen.add(name)
    return [name for name in available if name in seen]


def target_class(label: str, classes: Sequence[str], field: str = "target_class") -> int | None:
    """Index of the class to explain; None = the top prediction."""
    if not label:
        return None
    if label not in classes:
        shown = ", ".join(list(classes)[:20])
        raise InvalidInput(field, f"unknown class {label!r}; valid: {shown}")
    return list(classes).index(label)


def map_size(size: int, input_size: int) -> int:
    """0 = the layer's own resolution; otherwise 1..input_size pixels."""
    if size < 0 or size > input_size:
        raise InvalidInput("map_size", f"must be in 0..{input_size} (0 = layer resolution), got {size}")
    return size


def depth(value: int, n_layers: int) -> int:
    """0 = 1 (no links); otherwise 1..number of requested layers."""
    if value == 0:
        return 1
    if value < 0 or value > n_layers:
        raise InvalidInput("depth", f"must be in 1..{n_layers} (the number of requested layers), got {value}")
    return value


def candidates(value: int, cap: int) -> int:
    """0 = 32 (capped); otherwise 1..cap."""
    if value == 0:
        return min(DEFAULT_CANDIDATES, cap)
    if value < 0 or value > cap:
        raise InvalidInput("candidates", f"must be in 1..{cap}, got {value}")
    return value


def page(page_size: int, page_token: str) -> tuple[int, int]:
    """(offset, size) of a ListModels page; size 0 = all. The token is the decimal offset we handed out."""
    if page_size < 0:
        raise InvalidInput("page_size", f"must be >= 0, got {page_size}")
    if not page_token:
        return 0, page_size
    if not page_token.isdigit() or len(page_token) > 9:
        raise InvalidInput("page_token", "malformed; pass back a next_page_token unchanged")
    return int(page_token), page_size


def link_work(top_k_units: int, depth: int, cap: int) -> int:
    """Units that get contributor links per image: k + k^2 + ... + k^(depth-1). Over `cap` the request is
    refused with QueueFull (RESOURCE_EXHAUSTED): it is valid, the server just will not do that much work."""
    work = sum(top_k_units**level for level in range(1, depth))
    if work > cap:
        raise QueueFull(f"depth {depth} with top_k_units {top_k_units} links {work} units per image, over the "
                        f"server's cap of {cap}; lower depth or top_k_units")
    return work
