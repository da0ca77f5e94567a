"""Ghost networks: random erosions of one model, redrawn at every forward pass, and the attack over them.

Li, Bai, Zhou, Xie, Zhang & Yuille, "Learning Transferable Adversarial Examples via Ghost Networks",
AAAI 2020. Everything is done with forward hooks that live only for one forward pass; the model is never
rewritten and every hook is removed in `finally`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torchvision.models.convnext import CNBlock

from ..errors import InvalidInput
from .base import AttackParams, Eps, Predict, check_eps, check_steps
from .ensemble import EnsembleAttack

log = logging.getLogger(__name__)


def residual_blocks(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(block, its last residual BatchNorm) for every block built like torchvision's BasicBlock (bn2) or
    Bottleneck (bn3), which includes `zoo.ResidualBlock`: same attribute names, out = relu(bn_last + identity)."""
    found = []
    for module in model.modules():
        if not hasattr(module, "downsample"):
            continue
        last = getattr(module, "bn3", None) or getattr(module, "bn2", None)
        if isinstance(last, nn.BatchNorm2d):
            found.append((module, last))
    return found


def additive_blocks(model: nn.Module) -> list[nn.Module]:
    """Blocks whose output is input + branch(input) with no operation after the sum: timm's inverted residuals
    (EfficientNet, MobileNet: `has_skip`) and ConvNeXt blocks (identity `shortcut`); torchvision's inverted
    residuals (MobileNetV2/V3, EfficientNet: `use_res_connect`; MNASNet: `apply_residual`) and ConvNeXt blocks
    (`CNBlock`). Their skip is eroded as out - (1 - λ)·input = λ·input + branch(input)."""
    return [m for m in model.modules() if getattr(m, "has_skip", False) is True
            or getattr(m, "use_res_connect", False) is True or getattr(m, "apply_residual", False) is True
            or isinstance(m, CNBlock)
            or (isinstance(getattr(m, "shortcut", None), nn.Identity) and hasattr(m, "drop_path"))]


def has_erodable_skips(model: nn.Module) -> bool:
    """Whether ghost networks of `model` can erode residual skips (`residual_blocks` or `additive_blocks`)."""
    return bool(residual_blocks(model) or additive_blocks(model))


class GhostNetwork(nn.Module):
    """A randomly eroded view of `model`, freshly drawn at every forward pass.

    Skip erosion: each residual block's identity branch is scaled per channel by λ ~ U[1-Λ, 1+Λ]
    (Λ = `skip_erosion`). For λ > 0, relu(r + λ·i) = λ·relu(r/λ + i), so a hook dividing the block's last BN
    output by λ and a hook multiplying the block output by λ scale the skip exactly, without touching `forward`.
    Dropout erosion (`dropout_keep` = p): every conv output is multiplied by Bernoulli(p)/p, in eval mode too.
    A model without residual blocks and no `dropout_keep` gets dropout erosion with p = 0.99.

    Shapes: like the model, (N,C,H,W) in [0,1] -> (N,K) logits.

    Example::

        ghost = GhostNetwork(model, skip_erosion=0.2)
        logits = ghost(images)     # a different ghost each call; `model` itself is unchanged
    """

    def __init__(
        self, model: nn.Module, skip_erosion: float = 0.2, dropout_keep: float | None = None, seed: int | None = None
    ) -> None:
        super().__init__()
        if not 0 <= skip_erosion < 1:
            raise InvalidInput("skip_erosion", f"must lie in [0, 1) so every λ stays positive, got {skip_erosion}")
        if dropout_keep is not None and not 0 < dropout_keep <= 1:
            raise InvalidInput("dropout_keep", f"must lie in (0, 1], got {dropout_keep}")
        self.model, self.skip_erosion, self.seed = model, skip_erosion, seed
        self.blocks = residual_blocks(model) if skip_erosion > 0 else []
        self.additive = additive_blocks(model) if skip_erosion > 0 else []
        if not self.blocks and not self.additive and dropout_keep is None:
            log.info("ghost network: no residual blocks to erode in %s; using dropout erosion", type(model).__name__)
            dropout_keep = 0.99
        self.dropout_keep = dropout_keep
        self._generator: torch.Generator | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.eroded(images.device):
            return self.model(images)

    def _rand(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if self.seed is not None and (self._generator is None or self._generator.device != like.device):
            self._generator = torch.Generator(device=like.device).manual_seed(self.seed)
        return torch.rand(shape, generator=self._generator, device=like.device, dtype=like.dtype)

    @contextmanager
    def eroded(self, device: torch.device) -> Iterator[None]:
        """Hooks for one ghost draw; every handle is removed on exit, also when the forward pass raises."""
        with ExitStack() as stack:
            for block, last_bn in self.blocks:
                lam: dict[str, torch.Tensor] = {}
                hooks = (
                    block.register_forward_pre_hook(self._draw_skip(lam, last_bn.num_features)),
                    last_bn.register_forward_hook(lambda _m, _i, out, lam=lam: out / lam["v"]),
                    block.register_forward_hook(lambda _m, _i, out, lam=lam: out * lam["v"]),
                )
                for handle in hooks:
                    stack.callback(handle.remove)
            for block in self.additive:
                lam = {}
                hooks = (block.register_forward_pre_hook(self._draw_skip(lam, None)),
                         block.register_forward_hook(lambda _m, i, out, lam=lam: out - (1 - lam["v"]) * i[0]))
                for handle in hooks:
                    stack.callback(handle.remove)
            if self.dropout_keep is not None and self.dropout_keep < 1:
                for module in self.model.modules():
                    if isinstance(module, nn.Conv2d):
                        stack.callback(module.register_forward_hook(self._dropout).remove)
            yield

    def _draw_skip(self, lam: dict[str, torch.Tensor], channels: int | None) -> Callable:
        def pre_hook(_module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            u = self._rand((1, x.shape[1] if channels is None else channels, 1, 1), x)
            lam["v"] = 1 - self.skip_erosion + 2 * self.skip_erosion * u

        return pre_hook

    def _dropout(self, _module: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        keep = self.dropout_keep
        return out * (self._rand(tuple(out.shape), out) < keep).to(out.dtype) / keep


class GhostEnsemble(EnsembleAttack):
    """The ensemble-optimization attack over `members` ghost networks of one model, each redrawn at every step
    (the paper's longitudinal ensemble, widened by `members`), plus any `others` (further models taking the same
    images, e.g. other served models) with equal weight. Success is judged on the unmodified model. L∞.

    Defaults were measured on ShapesWorld (tests/handlers/test_transfer.py): skip erosion 0.2 plus dropout
    erosion (keep 0.9) and PGD's step size 2.5·ε/steps (rather than MI-FGSM's ε/steps) transfer to a held-out
    model better than PGD at the same ε and steps; ε/steps or skip erosion alone did not.

    Shapes: images (N,C,H,W) in [0,1], labels (N,) int, optional target (N,) int; result.adv (N,C,H,W).
    A model with no residual skips to erode (`has_erodable_skips`) is refused with InvalidInput: dropout-only
    ghosts are not the method.

    Example::

        atk = GhostEnsemble(model, eps=8/255, steps=10, members=2, skip_erosion=0.2)
        result = atk(images, labels)       # examples that transfer better to other models
    """

    def __init__(
        self,
        model: nn.Module,
        eps: Eps = 8 / 255,
        alpha: Eps | None = None,
        steps: int = 10,
        *,
        members: int = 2,
        skip_erosion: float = 0.2,
        dropout_keep: float | None = 0.9,
        decay: float = 1.0,
        targeted: bool = False,
        seed: int | None = None,
        others: Sequence[Predict] = (),
    ) -> None:
        check_steps(members, "members")
        check_eps(eps)
        check_steps(steps)
        if skip_erosion > 0 and not has_erodable_skips(model):  # its ghosts would be dropout-only: not the method
            name = getattr(model, "arch", None) or type(model).__name__
            raise InvalidInput("attack", f"ghost-ensemble erodes residual skips, and {name} has none it can erode "
                                         "(ResNet, ConvNeXt, EfficientNet/MobileNet blocks): use pgd, mifgsm or fgsm")
        alpha = 2.5 * eps / steps if alpha is None else alpha
        ghosts = [
            GhostNetwork(model, skip_erosion, dropout_keep, None if seed is None else seed + i) for i in range(members)
        ]
        super().__init__([*ghosts, *others], None, eps, alpha, steps, decay=decay, targeted=targeted)
        self.model = model  # judge on the real model, attack through its ghosts

    @classmethod
    def from_params(cls, model: nn.Module, params: AttackParams) -> GhostEnsemble:
        return cls(model, params.eps, params.step_size, params.steps, members=params.ghosts,
                   targeted=params.targeted, seed=params.seed, others=params.others)
