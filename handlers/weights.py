"""Outside weights in, never pickle-executed: a state dict from safetensors or a torch checkpoint, fitted to a
network with every mismatch named.

- `.safetensors`: read with safetensors (no code can run).
- `.pt` / `.pth` / `.bin` / `.ckpt`: `torch.load(weights_only=True)`, which unpickles tensors and plain
  containers only and refuses anything else; a checkpoint dict holding the state dict under `state_dict`,
  `model`, `model_state_dict`, `net` or `module` is unwrapped.
- Key prefixes added by wrappers (`module.` from DataParallel/DDP, `model.`, `net.`) are stripped when that
  makes the keys fit the network; missing or unexpected keys, or tensors of another shape, are an error that
  names them. With `replace_head`, a head trained for another class count is left at its fresh initialisation
  (the caller's network already has the new count).
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import InvalidInput

CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict", "net", "module")
PREFIXES = ("module.", "model.", "net.")
_SHOWN = 6


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or a torch state dict / checkpoint, loaded on CPU without running code."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput("weights", f"no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise InvalidInput("weights", f"{path.name} is not a readable safetensors file: {err}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says it all
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InvalidInput("weights", f"{path.name} is not a plain state dict: it needs {_unpickle_reason(err)}, "
                                      "refused (weights are never unpickled with code execution)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise InvalidInput("weights", f"{path.name} is not a torch state dict: {str(err).splitlines()[0]}") from None
    return _unwrap(obj, path.name)


def _unpickle_reason(err: Exception) -> str:
    """What torch's weights-only unpickler refused, from its long message ("GLOBAL __main__.Net", ...)."""
    text = str(err)
    match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if match:
        return f"the Python object {match.group(1)}"
    match = re.search(r"Unsupported operand (\d+)", text)
    return f"pickle opcode {match.group(1)} (a generic pickle, not torch.save)" if match else "arbitrary objects"


def _unwrap(obj: object, name: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in CHECKPOINT_KEYS:
            if isinstance(obj.get(key), Mapping) and _is_state_dict(obj[key]):
                return {str(k): v for k, v in obj[key].items()}
        keys = ", ".join(map(str, list(obj)[:_SHOWN]))
        raise InvalidInput("weights", f"{name} is a dict but not a state dict (keys: {keys}) and holds none under "
                                      f"{', '.join(CHECKPOINT_KEYS)}")
    if not isinstance(obj, Mapping):
        raise InvalidInput("weights", f"{name} holds a {type(obj).__name__}, not a state dict")
    return {str(k): v for k, v in obj.items()}


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def strip_prefixes(state: Mapping[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (`module.`, `model.`, `net.`, repeated) from every key while that makes more keys
    match `expected`."""
    state = dict(state)
    while True:
        hits = len(expected & set(state))
        best = None
        for prefix in PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                stripped = {k[len(prefix):]: v for k, v in state.items()}
                if len(expected & set(stripped)) > hits:
                    best = stripped
                    break
        if best is None:
            return state
        state = best


def fit_state_dict(net: nn.Module, state: Mapping[str, torch.Tensor], *, head: str = "", replace_head: bool = False,
                   arch: str = "") -> list[str]:
    """Load `state` into `net` (the bare network, without the zoo wrapper). Returns the keys left at their fresh
    initialisation (the head's, with `replace_head`). Raises InvalidInput naming missing, unexpected or
    mis-shaped keys; a head of another class count names both counts."""
    target = net.state_dict()
    state = strip_prefixes(state, set(target))
    what = arch or type(net).__name__
    head_keys = {k for k in target if head and k.startswith(head + ".")}
    shape_errors = {k: (tuple(v.shape), tuple(target[k].shape)) for k, v in state.items()
                    if k in target and tuple(v.shape) != tuple(target[k].shape)}
    head_mismatch = {k for k in shape_errors if k in head_keys}
    if head_mismatch and not replace_head:
        k = sorted(head_mismatch)[0]
        raise InvalidInput("classes", f"the weights' head {k} has {shape_errors[k][0][0]} outputs but "
                                      f"{shape_errors[k][1][0]} classes were given (pass --replace-head to "
                                      "train a new head for these classes)")
    head_absent = bool(head_keys) and not head_keys <= set(state)  # a backbone-only checkpoint
    kept = sorted(head_keys) if replace_head and (head_mismatch or head_absent) else []
    other_shapes = {k: v for k, v in shape_errors.items() if k not in kept}
    missing = sorted(set(target) - set(state) - set(kept))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected or other_shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
        if other_shapes:
            shown = "; ".join(f"{k} {a} vs {b}" for k, (a, b) in sorted(other_shapes.items())[:3])
            parts.append(f"{len(other_shapes)} of another shape ({shown})")
        raise InvalidInput("weights", f"these weights do not fit {what}: {', '.join(parts)}")
    to_load = {k: v for k, v in state.items() if k not in kept}
    net.load_state_dict(to_load, strict=not kept)
    return kept


def head_name(net: nn.Module, verified: str = "") -> str:
    """The classifier a new class count replaces: the spec's verified linear head, else the last linear layer."""
    if verified:
        return verified
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else ""


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")
