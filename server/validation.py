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
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_VERSION_TEXT = re.compile(r"[0-9]{1,18}")  # ASCII digits (re's \d would match "²" too), within int64
_RESOURCE_NAME = re.compile(r"models/(?P<name>[^/]*)(?:/versions/(?P<version>[^/]*))?")
_PAGE_TOKEN = re.compile(r"[0-9]{1,9}")


def model_name(name: str, field: str = "model") -> str:
    """A model name as it appears in the repository (a directory name)."""
    if not name:
        raise InvalidInput(field, "required; call ListModels for the served names")
    if not _MODEL_NAME.fullmatch(name):
        raise InvalidInput(field, f"{name[:64]!r} is not a valid model name (letters, digits, _ . -)")
    return name


def version(value: int) -> int:
    """0 = latest; otherwise a positive version number."""
    if value < 0:
        raise InvalidInput("version", f"must be >= 0 (0 = latest), got {value}")
    return value


def version_text(text: str, field: str) -> int:
    """A version written as text (a resource name's `versions/V`): ASCII digits only, so "²" (which
    `str.isdigit` accepts and `int` refuses) is a bad field, not an internal error."""
    if not _VERSION_TEXT.fullmatch(text) or int(text) < 1:
        raise InvalidInput(field, f"version {text[:32]!r} is not a positive decimal number")
    return int(text)


def model_ref(name: str, version_value: int, field: str = "model") -> tuple[str, int]:
    """(model, version) named by a request: `name` is the short name ("shapes") or a resource name that
    ListModels/GetModel return, "models/shapes" or "models/shapes/versions/1"; `version_value` is the request's
    version field (0 = latest). A version in both that disagrees is INVALID_ARGUMENT naming both fields."""
    version(version_value)
    if not name.startswith("models/"):
        return model_name(name, field), version_value
    match = _RESOURCE_NAME.fullmatch(name)
    if match is None:
        raise InvalidInput(field, f"{name[:64]!r} is not a model resource name (models/NAME or "
                           "models/NAME/versions/V)")
    short = model_name(match["name"], field)
    if match["version"] is None:
        return short, version_value
    named = version_text(match["version"], field)
    if version_value and version_value != named:
        raise InvalidInput(f"{field}, version", f"{field} {name[:64]!r} names version {named} but version is "
                           f"{version_value}; give the version once")
    return short, named


def short_model_name(name: str) -> str:
    """The short name inside any form `model_ref` accepts ("models/x/versions/1" -> "x"), for metric labels;
    other text comes back unchanged."""
    match = _RESOURCE_NAME.fullmatch(name)
    return match["name"] if match else name


def get_model_ref(name: str, model: str, version_value: int) -> tuple[str, int]:
    """GetModel's target: the resource name `name` (AIP-131) or the older `model` field, both in any form
    `model_ref` accepts; given both, they must name the same model and version."""
    if not name:
        return model_ref(model, version_value, "model")
    by_name = model_ref(name, version_value, "name")
    if not model:
        return by_name
    by_model = model_ref(model, version_value, "model")
    versions = {v for v in (by_name[1], by_model[1]) if v}
    if by_name[0] != by_model[0] or len(versions) > 1:
        raise InvalidInput("name, model", f"name {name[:64]!r} and model {model[:64]!r} name different models; "
                           "give one")
    return by_name[0], max(versions, default=0)


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
    if not _PAGE_TOKEN.fullmatch(page_token):  # ASCII digits: "²".isdigit() is True but int("²") fails
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
