"""Architectures from the ecosystem: any torchvision classification CNN and any timm CNN, by name.

`torchvision:NAME` or a bare torchvision name (`densenet121`, `efficientnet_b0`...) and `timm:NAME`
(`timm:convnext_tiny`) resolve to a zoo `ArchSpec` whose layers are derived from the model itself, never from
a hand-written table (docs/design.md, "bring your own model"):
- stages: timm's `feature_info` (module names, channels, reductions); for torchvision, one probe forward pass
  and, per output resolution, the last module to finish that produces (N, C, H, W) maps at that resolution
  only (pools, identities and containers spanning several resolutions excluded);
- default traced layers: the last two stages;
- the last-layer exact path: only when the head is *verified* to be global average pooling + one linear layer
  of the last stage (logits equal W·mean(A) + b for two random replacement maps A); ConvNeXt's norm after
  pooling or a classifier MLP fail the check and take the exact hidden-layer path instead.
Nothing is downloaded: every network is built with random weights (`pretrained=False`, `weights=None`).
What has no (N, C, H, W) unit maps at its stages (vision transformers, channels-last Swin) is refused with
one line saying why.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from .errors import InvalidInput, UnknownName

TIMM_PREFIX = "timm:"
TORCHVISION_PREFIX = "torchvision:"
# torchvision classification models that are transformers: their units are tokens, not (N, C, H, W) maps
_TORCHVISION_TRANSFORMERS = ("vit_", "swin_", "maxvit_")
_PROBE_SIZE = 128  # probe forward passes (torchvision stage discovery, checks); retried larger for nets that need it
_NOT_A_STAGE = (nn.Identity, nn.Dropout, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class Derived:
    """What the zoo needs about an external architecture, derived from one instance of it."""

    build: Callable[[int], nn.Module]
    stages: tuple[str, ...]  # shallow -> deep, each with (N, C, H, W) outputs
    head: str  # the classifier module ("" when the head is not pooling + one linear layer)
    default_input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def is_external(name: str) -> bool:
    """Whether `name` is meant for this module (it may still be unknown or refused)."""
    return name.startswith((TIMM_PREFIX, TORCHVISION_PREFIX)) or name in _torchvision_names()


@functools.cache
def derive(name: str) -> Derived:
    """Build `name` once with random weights and derive its stages and head (cached per process)."""
    if name.startswith(TIMM_PREFIX):
        return _derive_timm(name.removeprefix(TIMM_PREFIX))
    return _derive_torchvision(name.removeprefix(TORCHVISION_PREFIX))


@functools.cache
def _torchvision_names() -> frozenset[str]:
    return frozenset(torchvision.models.list_models(module=torchvision.models))


def _derive_timm(model_name: str) -> Derived:
    import timm
    from timm.models import FeatureInfo

    arch = TIMM_PREFIX + model_name
    if not model_name or not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=8, cutoff=0.6)
        raise UnknownName("timm model", model_name, close or ["(no close match; see timm.list_models())"])

    def build(num_classes: int) -> nn.Module:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes)

    net = build(2).eval()
    if not getattr(net, "feature_info", None):
        raise InvalidInput("arch", f"{arch} does not describe its stages (no timm feature_info): not supported")
    info = FeatureInfo(list(net.feature_info), out_indices=tuple(range(len(net.feature_info))))
    stages = tuple(info.module_name())
    cfg = net.pretrained_cfg or {}
    size = int((cfg.get("input_size") or (3, 224, 224))[-1])
    probe = size if cfg.get("fixed_input_size") else _PROBE_SIZE  # the checks are size-independent: keep them cheap
    try:
        _check_unit_maps(arch, net, stages, tuple(info.channels()), probe)
    except RuntimeError:  # too small for this network
        probe = size
        _check_unit_maps(arch, net, stages, tuple(info.channels()), probe)
    classifier = net.get_classifier()
    head = next((n for n, m in net.named_modules() if m is classifier), "")
    pre_pool = _pre_pool_layer(net, stages[-1], head, probe)
    if pre_pool:  # a conv head after the last feature stage (EfficientNet's bn2): the layer the pooling reads
        stages = (*stages, pre_pool)
    head = head if _verified_linear_head(net, stages[-1], head, probe) else ""
    return Derived(build, stages, head, size, tuple(cfg.get("mean") or (0.485, 0.456, 0.406)),
                   tuple(cfg.get("std") or (0.229, 0.224, 0.225)))


def _derive_torchvision(model_name: str) -> Derived:
    arch = model_name
    if model_name not in _torchvision_names():
        close = difflib.get_close_matches(model_name, sorted(_torchvision_names()), n=8, cutoff=0.5)
        raise UnknownName("torchvision classification model", model_name, close or sorted(_torchvision_names()))
    if model_name.startswith(_TORCHVISION_TRANSFORMERS):
        raise InvalidInput("arch", f"{arch} is a vision transformer: its units are tokens, not (N, C, H, W) maps "
                                   "that dissection and tracing need; only CNNs are supported for now")

    def build(num_classes: int) -> nn.Module:
        kwargs = {"aux_logits": False, "init_weights": False} if model_name in ("inception_v3", "googlenet") else {}
        return torchvision.models.get_model(model_name, weights=None, num_classes=num_classes, **kwargs)

    net = build(2).eval()
    try:
        size, stages = _PROBE_SIZE, _torchvision_stages(net, _PROBE_SIZE)
    except RuntimeError:  # too small for the network's valid convolutions (inception)
        size, stages = 299, _torchvision_stages(net, 299)
    if not stages:
        raise InvalidInput("arch", f"{arch} has no layer with (N, C, H, W) unit maps: not a CNN")
    heads = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    head = heads[-1] if heads and _verified_linear_head(net, stages[-1], heads[-1], size) else ""
    default_size = 299 if model_name == "inception_v3" else 224
    return Derived(build, stages, head, default_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _probe_pass(net: nn.Module, size: int, record: Callable[[str, object], None],
                names: Sequence[str] | None = None) -> None:
    """One forward pass of a random image with `record(name, output)` called for the modules `names` (default:
    every module that could be a stage), in the order they finish; the hooks are removed whatever happens."""
    modules = ([(n, net.get_submodule(n)) for n in names] if names is not None else
               [(n, m) for n, m in net.named_modules() if n and not isinstance(m, _NOT_A_STAGE)])
    handles = [m.register_forward_hook(lambda _m, _i, out, n=n: record(n, out)) for n, m in modules]
    try:
        with torch.no_grad():
            net(torch.rand(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()


def _torchvision_stages(net: nn.Module, size: int) -> tuple[str, ...]:
    """One probe pass, then a walk down from the root: a module whose direct children output (N, C, H, W) maps
    at several resolutions (`features`, the root of a resnet) is walked into; any other module with such an
    output is a block, at its output's resolution. Per resolution, the block that finishes last is that
    resolution's stage (`layer4`, `features.8`, `denseblock2`). 1x1 maps (squeeze-excitation gates, pooled
    features) and pooling layers do not count."""
    finish: dict[str, int] = {}
    out_res: dict[str, tuple[int, int]] = {}

    def record(name: str, out: object) -> None:
        finish[name] = len(finish)
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1:
            out_res[name] = tuple(out.shape[-2:])

    _probe_pass(net, size, record)
    blocks: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = prefix + child_name
            if name not in out_res:
                continue
            inner = {out_res[prefix_name] for prefix_name in (f"{name}.{n}" for n, _ in child.named_children())
                     if prefix_name in out_res}
            if len(inner) > 1:
                walk(child, name + ".")
            else:
                blocks.append(name)

    walk(net, "")
    last_at: dict[tuple[int, int], str] = {}
    for name in sorted(blocks, key=finish.__getitem__):
        last_at[out_res[name]] = name
    return tuple(sorted(last_at.values(), key=finish.__getitem__))


def _check_unit_maps(arch: str, net: nn.Module, stages: tuple[str, ...], channels: tuple[int, ...],
                     size: int) -> None:
    """Refuse, in one line, a model whose last two stages do not give (N, C, H, W) maps with C = channels."""
    seen: dict[str, object] = {}
    _probe_pass(net, size, seen.__setitem__, stages[-2:])
    for stage, c in zip(stages[-2:], channels[-2:], strict=True):
        out = seen.get(stage)
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise InvalidInput("arch", f"{arch} is not a CNN: its stage {stage} gives {shape} (tokens), not "
                                       "(N, C, H, W) unit maps that dissection and tracing need")
        if out.shape[1] != c:
            raise InvalidInput("arch", f"{arch}: stage {stage} gives {shape}, channels last (not (N, C, H, W) "
                                       "unit maps that dissection and tracing need)")


def _pre_pool_layer(net: nn.Module, last_stage: str, head: str, size: int) -> str:
    """The module after `last_stage` whose (N, C, H>1, W) output the head pools, when the head is verified to be
    pooling + `head` on it (EfficientNet's conv head + bn2); "" when there is none."""
    linear = net.get_submodule(head) if head else None
    if not isinstance(linear, nn.Linear):
        return ""
    order: list[tuple[str, torch.Tensor]] = []
    _probe_pass(net, size, lambda name, out: order.append((name, out)))
    names = [n for n, _ in order]
    if last_stage not in names:
        return ""
    after = [n for n, out in order[names.index(last_stage) + 1:]
             if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[1] == linear.in_features
             and out.shape[-1] * out.shape[-2] > 1 and not n.startswith(last_stage + ".")]
    return after[-1] if after and _verified_linear_head(net, after[-1], head, size) else ""


def _verified_linear_head(net: nn.Module, layer: str, head: str, size: int) -> bool:
    """True when logits = W·mean_hw(A) + b exactly for the `layer` output A, checked by replacing A with two
    random maps: the head is global average pooling + the one linear layer `head` (docs/design.md §5's free path)."""
    if not head:
        return False
    linear = net.get_submodule(head)
    if not isinstance(linear, nn.Linear):
        return False
    module = net.get_submodule(layer)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        seen: dict[str, torch.Tensor] = {}
        handle = module.register_forward_hook(lambda _m, _i, out: seen.__setitem__("a", out))
        try:
            net(torch.rand(1, 3, size, size, generator=generator))
        finally:
            handle.remove()
        a = seen.get("a")
        if not isinstance(a, torch.Tensor) or a.dim() != 4 or a.shape[1] != linear.in_features:
            return False
        for _ in range(2):
            fake = torch.randn(a.shape, generator=generator).abs() * 3
            handle = module.register_forward_hook(lambda _m, _i, _out, fake=fake: fake.clone())
            try:
                logits = net(torch.rand(1, 3, size, size, generator=generator))
            finally:
                handle.remove()
            expected = linear(fake.mean(dim=(2, 3)))
            if logits.shape != expected.shape or not torch.allclose(logits, expected, rtol=1e-4, atol=1e-4):
                return False
    return True
