"""`model.init_weights`: start training from existing weights (an imported or trained run, a bundle, or a weights
file) instead of a random initialisation, e.g. to fine-tune an imported model with the consistent loss."""

from __future__ import annotations

import json
from pathlib import Path

from conceptlens.handlers import zoo
from conceptlens.handlers.bundle import MANIFEST
from conceptlens.handlers.bundle import WEIGHTS_FILE as BUNDLE_WEIGHTS
from conceptlens.handlers.errors import InvalidInput
from conceptlens.handlers.weights import fit_state_dict, head_name, read_state_dict

from .run import RUN_FILE, WEIGHTS_FILE

FIELD = "model.init_weights"
_WRAPPER_BUFFERS = ("mean", "std")  # ImageClassifier's normalisation: the config's model.mean/std decide those


def load_initial_weights(model: zoo.ImageClassifier, source: str | Path, *, replace_head: bool = False) -> list[str]:
    """Load `source` (a run directory, a bundle directory, or a .safetensors/.pt/.pth state dict) into `model`.
    Returns the keys left at their fresh initialisation (a replaced head). Raises InvalidInput naming the field
    and the problem: missing file, another architecture, another class count or class order."""
    path = Path(source)
    classes: list[str] | None = None
    if path.is_dir():
        if (path / RUN_FILE).is_file():
            meta, file = json.loads((path / RUN_FILE).read_text()), path / WEIGHTS_FILE
        elif (path / MANIFEST).is_file():
            meta, file = json.loads((path / MANIFEST).read_text()), path / BUNDLE_WEIGHTS
        else:
            raise InvalidInput(FIELD, f"{path} is neither a run ({RUN_FILE}) nor a bundle ({MANIFEST})")
        if meta.get("architecture") not in (None, model.arch):
            raise InvalidInput(FIELD, f"{path} holds a {meta['architecture']}, the config trains a {model.arch}")
        classes = list(meta.get("classes") or []) or None
    elif path.is_file():
        file = path
    else:
        raise InvalidInput(FIELD, f"no such file or directory: {path}")
    if classes is not None and len(classes) == len(model.classes) and classes != model.classes and not replace_head:
        raise InvalidInput(FIELD, f"{path}'s classes {classes[:4]}... are not the training data's "
                                  f"{model.classes[:4]}... in that order (set model.replace_head = true to retrain "
                                  "the head)")
    state = {k: v for k, v in read_state_dict(file).items() if k not in _WRAPPER_BUFFERS}
    try:
        return fit_state_dict(model.net, state, head=head_name(model.net, model.spec.head),
                              replace_head=replace_head, arch=model.arch)
    except InvalidInput as err:
        raise InvalidInput(FIELD, f"{path}: {err.problem}".replace("--replace-head", "model.replace_head")) from None
