"""Robustness probes (docs/design.md §7, issue 6): does a prediction flip under attack, at what ε, and why.

A probe runs one attack of the library (`handlers/attacks`, the same PGD the trainer and `conceptlens evaluate`
use) on a batch of images, either at a fixed ε or searching each image's minimal flipping ε in a range with
`MinimalEpsilon` (one batched pass over images × candidates, then bisection to a tolerance). It then explains
the change: the clean and adversarial inputs are traced (`handlers/trace.py`) and, per requested layer, the
units whose influence Δ on the clean top class changed most are reported with their concepts.

Gradient attacks run on the runtime's torch model under its `torch_lock` (ghost networks hook the model, and a
concurrent trace's hooks must not leak into an attack's forward passes). Square queries only the ONNX session,
so it needs no torch weights; its trace then uses the closed-form head layer, also without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .attacks import Attack, AttackParams, AttackResult, attack_kind
from .attacks.minimal_eps import MinimalEpsilon
from .backends import ModelRuntime
from .trace import TraceOptions, TraceResult, hidden_deltas, trace_image

Check = Callable[[], None]  # raises to abandon the probe (deadline)


@dataclass(frozen=True)
class ProbeSpec:
    """A probe's attack: the one type from the server's request validation (server/probe_validation.py)
    through the worker pipe to `build_attack`. Exactly one of `eps` (fixed budget) and `eps_range` (search) is
    set."""

    kind: str  # attack catalogue name (handlers/attacks/registry.py)
    norm: str = "linf"
    eps: float | None = 8 / 255
    eps_range: tuple[float, float] | None = None
    tolerance: float = 1 / 255
    steps: int = 10  # iterations; Square: queries per image
    restarts: int = 1
    step_size: float | None = None  # None: the attack's default fraction of ε
    target: int | None = None  # class index for a targeted attack
    seed: int = 0
    random_start: bool = True  # PGD at a fixed ε; a search always starts at the clean image
    # ghost-ensemble: other served models added to the ensemble (ModelRuntimes; RuntimeRefs while in a pipe)
    members: tuple[Any, ...] = ()
    ghosts: int = 2  # ghost-ensemble: ghost networks of the probed model
    candidates: int = 8  # minimal-ε search: points of the coarse grid


@dataclass
class UnitChange:
    layer: str
    unit: int
    clean_activation: float
    adversarial_activation: float
    clean_delta: float
    adversarial_delta: float
    concept: str
    category: str
    iou: float
    detector: bool


@dataclass
class ImageProbe:
    """One image's probe result. Logits are (K,); images (C,H,W) in [0,1]."""

    flipped: bool
    min_eps: float | None  # range mode: smallest flipping ε; fixed mode: ε when flipped
    clean_logits: np.ndarray
    adversarial_logits: np.ndarray
    adversarial: np.ndarray
    perturbation: np.ndarray  # (H, W): max_c |adversarial - clean|
    changes: list[UnitChange]
    clean_trace: TraceResult
    adversarial_trace: TraceResult


def build_attack(runtime: ModelRuntime, spec: ProbeSpec, eps: float | torch.Tensor, *, search: bool,
                 check: Check | None = None) -> Attack:
    """The catalogue's attack for `spec` at budget `eps` (a float or per-sample tensor). A search needs a
    deterministic attack (`AttackParams.deterministic`): PGD then starts at the clean image, Square draws per
    image. A black-box kind sees only the ONNX session's logits."""
    kind = attack_kind(spec.kind)
    model = onnx_predict(runtime) if kind.black_box else runtime.torch_model
    params = AttackParams(eps=eps, norm=spec.norm, steps=spec.steps, step_size=spec.step_size,
                          random_start=spec.random_start, restarts=spec.restarts, targeted=spec.target is not None,
                          seed=spec.seed, ghosts=spec.ghosts, others=tuple(m.torch_model for m in spec.members),
                          deterministic=search)
    atk = kind.build(model, params)
    if check is not None:
        atk.callback = lambda _step: check()
    return atk


def onnx_predict(runtime: ModelRuntime) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits from the ONNX session only (no torch model, no gradient): Square's view of the model."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        logits = runtime.forward(x.detach().cpu().numpy()).logits
        return torch.from_numpy(logits).to(x.device)

    return predict


def attack(runtime: ModelRuntime, spec: ProbeSpec, images: torch.Tensor, labels: torch.Tensor,
           check: Check | None = None) -> AttackResult:
    """Run the attack (fixed ε or minimal-ε search) against `labels` (the clean predictions when untargeted)."""
    target = None if spec.target is None else torch.full_like(labels, spec.target)
    if spec.eps_range is None:
        run: Callable = build_attack(runtime, spec, spec.eps, search=False, check=check)
    else:
        run = MinimalEpsilon(lambda e: build_attack(runtime, spec, e, search=True, check=check), spec.eps_range,
                             spec.tolerance, spec.candidates, targeted=spec.target is not None)
    if attack_kind(spec.kind).black_box:  # ONNX only: no torch model to lock
        return run(images, labels, target)
    with ExitStack() as locks:  # every model whose hooks or flags the attack touches, in a fixed order
        for rt in sorted({id(r): r for r in (runtime, *spec.members)}.values(), key=lambda r: (r.name, r.version)):
            locks.enter_context(rt.torch_lock)
        return run(images, labels, target)


def probe(runtime: ModelRuntime, images: np.ndarray, spec: ProbeSpec, options: TraceOptions, *,
          plausibility_threshold: float = 0.5, check: Check | None = None) -> list[ImageProbe]:
    """Probe each image of `images` (N,C,H,W) float32 in [0,1]. `options` says which layers to trace and how
    many changed units to report; `check` runs between attack steps and between images' traces."""
    clean = runtime.forward(images)
    labels = torch.from_numpy(clean.logits.argmax(1)).long()
    device = torch.device("cpu") if attack_kind(spec.kind).black_box else runtime.device
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    result = attack(runtime, spec, x, labels.to(device), check)
    adv = result.adv.detach().float().cpu().numpy()
    adv_logits = result.logits.detach().float().cpu().numpy()
    success = result.success.cpu().numpy()
    eps = result.eps.detach().float().cpu().numpy()
    adv_out = runtime.forward(adv)
    out = []
    for i in range(len(images)):
        if check is not None:
            check()
        flipped = bool(success[i])
        cls = int(labels[i])
        changes = unit_changes(runtime, images[i], adv[i], cls, options,
                               {name: clean.activations[name][i] for name in options.layers},
                               {name: adv_out.activations[name][i] for name in options.layers})
        out.append(ImageProbe(
            flipped=flipped,
            min_eps=float(eps[i]) if flipped and np.isfinite(eps[i]) else None,
            clean_logits=clean.logits[i], adversarial_logits=adv_logits[i], adversarial=adv[i],
            perturbation=np.abs(adv[i] - images[i]).max(axis=0),
            changes=changes,
            clean_trace=trace_image(runtime, images[i], clean.logits[i],
                                    {name: clean.activations[name][i] for name in options.layers}, options,
                                    plausibility_threshold=plausibility_threshold),
            adversarial_trace=trace_image(runtime, adv[i], adv_logits[i],
                                          {name: adv_out.activations[name][i] for name in options.layers}, options,
                                          plausibility_threshold=plausibility_threshold),
        ))
    return out


def unit_deltas(runtime: ModelRuntime, image: np.ndarray, acts: np.ndarray, layer: str, cls: int,
                candidates: int) -> np.ndarray:
    """Δ of every unit of `layer` on class `cls` for one image (C,H,W): exact and numpy-only at the head layer;
    for hidden layers exact for the top `candidates` by the first-order estimate, the estimate for the rest."""
    means = acts.reshape(acts.shape[0], -1).mean(axis=1)
    if runtime.head is not None and runtime.head.layer == layer:
        return runtime.head.weight[cls] * (means - runtime.baselines[layer])
    x = torch.from_numpy(np.ascontiguousarray(image)).unsqueeze(0).to(runtime.device)
    units, exact, estimate = hidden_deltas(runtime, x, layer, lambda logits, _store: logits[:, cls], [],
                                           TraceOptions(layers=[layer], candidates=candidates))
    deltas = estimate.astype(np.float32).copy()
    deltas[units] = exact
    return deltas


def unit_changes(runtime: ModelRuntime, image: np.ndarray, adversarial: np.ndarray, cls: int,
                 options: TraceOptions, clean_acts: dict[str, np.ndarray], adv_acts: dict[str, np.ndarray]
                 ) -> list[UnitChange]:
    """Per requested layer, the `options.top_k_units` units whose Δ on class `cls` (the clean top class) moved
    most between the clean and the adversarial image, largest |Δ_adv − Δ_clean| first."""
    changes: list[UnitChange] = []
    for layer in options.layers:
        d_clean = unit_deltas(runtime, image, clean_acts[layer], layer, cls, options.candidates)
        d_adv = unit_deltas(runtime, adversarial, adv_acts[layer], layer, cls, options.candidates)
        m_clean = clean_acts[layer].reshape(clean_acts[layer].shape[0], -1).mean(axis=1)
        m_adv = adv_acts[layer].reshape(adv_acts[layer].shape[0], -1).mean(axis=1)
        order = np.argsort(-np.abs(d_adv - d_clean), kind="stable")[: options.top_k_units]
        for k in order:
            info = runtime.layers[layer].units_info[int(k)]
            changes.append(UnitChange(layer, int(k), float(m_clean[k]), float(m_adv[k]), float(d_clean[k]),
                                      float(d_adv[k]), info.label, info.category, float(info.iou),
                                      bool(info.detector)))
    return changes

