"""The model zoo: architectures by name, the [0,1]-pixel wrapper, layer addressing and weight loading.

Lives in handlers/ rather than training/ because the server must rebuild the architecture named in a bundle's
manifest to load its safetensors, and nothing online imports training/.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from .errors import InvalidInput, UnknownName

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchSpec:
    """What the rest of the system needs to know about an architecture besides how to build it."""

    name: str
    build: Callable[[int], nn.Module]  # num_classes -> network taking normalised input
    last_layer: str  # the conv layer feeding global pooling + linear head: exact influence is free there
    head: str  # the linear classifier after global pooling
    default_layers: tuple[str, ...]  # layers traced and dissected by default
    stages: tuple[str, ...] = ()  # every stage output, shallow to deep (external architectures: derived)


_ARCHS: dict[str, ArchSpec] = {}


def register_arch(
    name: str, *, last_layer: str, head: str, default_layers: Sequence[str]
) -> Callable[[Callable[[int], nn.Module]], Callable[[int], nn.Module]]:
    """Decorator: register a `num_classes -> nn.Module` factory under `name` (warns on overwrite)."""

    def decorate(build: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        if name in _ARCHS:
            warnings.warn(f"architecture {name!r} registered twice; the later one wins", stacklevel=2)
        _ARCHS[name] = ArchSpec(name, build, last_layer, head, tuple(default_layers))
        return build

    return decorate


def list_archs() -> list[str]:
    return sorted(_ARCHS)


def arch_spec(name: str) -> ArchSpec:
    """The spec of a registered architecture, or of a torchvision/timm one (`timm:convnext_tiny`), derived from
    the model on first use (handlers/external_archs.py); an unknown or unsupported name raises one clear error."""
    if name not in _ARCHS:
        from . import external_archs

        if not external_archs.is_external(name):
            raise UnknownName("architecture", name, [*_ARCHS, "timm:<name>", "torchvision:<name>"])
        derived = external_archs.derive(name)
        _ARCHS[name] = ArchSpec(name, derived.build, derived.stages[-1], derived.head, derived.stages[-2:],
                                derived.stages)
    return _ARCHS[name]


def is_arch(name: str) -> bool:
    """Whether `name` resolves to a supported architecture (registered, or a torchvision/timm CNN)."""
    try:
        arch_spec(name)
    except (UnknownName, InvalidInput):
        return False
    return True


class ImageClassifier(nn.Module):
    """A network plus its input normalisation, so callers (attacks above all) work in [0,1] pixel space.

    `net` takes normalised input; `forward` takes images in [0,1] of shape (N, C, H, W).
    """

    def __init__(
        self,
        arch: str,
        net: nn.Module,
        classes: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        input_size: int,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.net = net
        self.classes = list(classes)
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def spec(self) -> ArchSpec:
        return arch_spec(self.arch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - self.mean) / self.std)


def build_model(
    arch: str,
    classes: Sequence[str],
    *,
    input_size: int = 64,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ImageClassifier:
    """Build `arch` with one output per class, wrapped to take [0,1] images. No weights are downloaded."""
    spec = arch_spec(arch)
    if len(classes) < 2:
        raise InvalidInput("classes", f"need at least 2 classes, got {len(classes)}")
    net = spec.build(len(classes))
    return ImageClassifier(
        arch, net, classes, mean or IMAGENET_MEAN, std or IMAGENET_STD, input_size
    )


def layer_names(model: nn.Module) -> list[str]:
    """Every addressable layer: dotted module names relative to the network (the wrapper is transparent)."""
    root = model.net if isinstance(model, ImageClassifier) else model
    return [name for name, _ in root.named_modules() if name]


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The module called `name`; an unknown name raises an error listing the valid ones."""
    root = model.net if isinstance(model, ImageClassifier) else model
    try:
        return root.get_submodule(name)
    except AttributeError:
        raise UnknownName("layer", name, layer_names(model)) from None


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors state dict (never pickle). Missing or unexpected keys are an error that names them."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InvalidInput("weights", f"no such file: {path}")
    state = load_file(str(path), device=str(next(model.parameters()).device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InvalidInput(
            "weights", f"{path.name} does not fit {getattr(model, 'arch', type(model).__name__)}: "
            f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )


def save_weights(model: nn.Module, path: str | Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path))


# --- architectures -------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """A torchvision-style basic block (same attribute names), so ghost-network skip erosion treats ours and
    torchvision's alike: out = relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallCNN(nn.Module):
    """The ShapesWorld model: a stem, three residual stages (each halves the resolution), GAP, linear head."""

    def __init__(self, num_classes: int, widths: Sequence[int] = (32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        c = widths[0]
        for i, w in enumerate(widths, start=1):
            setattr(self, f"layer{i}", ResidualBlock(c, w, stride=2))
            c = w
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


register_arch("small_cnn", last_layer="layer3", head="fc", default_layers=("layer2", "layer3"))(SmallCNN)


def _torchvision(name: str, last_layer: str, head: str, default_layers: Sequence[str]) -> None:
    def build(num_classes: int) -> nn.Module:
        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)

    register_arch(name, last_layer=last_layer, head=head, default_layers=default_layers)(build)


for _name in ("resnet18", "resnet34", "resnet50"):
    _torchvision(_name, "layer4", "fc", ("layer3", "layer4"))
# vgg's classifier is not a single linear over pooled features: its last conv layer gets the hidden-layer path.
_torchvision("vgg11", "features.18", "classifier.6", ("features.13", "features.18"))
_torchvision("vgg16", "features.29", "classifier.6", ("features.22", "features.29"))
_torchvision("mobilenet_v3_small", "features.12", "classifier.3", ("features.9", "features.12"))
