"""What every attack shares: the result type, input validation, eval mode and the success test.

An attack is a small class: build it once with its budget (`PGD(model, eps=8/255)`), call it on a batch
(`atk(images, labels)`), get an `AttackResult`. Subclasses only write `perturb`, the part that differs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInput
from ..modes import eval_mode

Predict = Callable[[torch.Tensor], torch.Tensor]
Eps = float | torch.Tensor


class AttackResult:
    """Adversarial images `adv` (N,C,H,W) in [0,1], the per-sample budget `eps` (N,) (for MinimalEpsilon the
    smallest flipping ε, inf where none was found), per-sample `success` (N,) bool and the adversarial `logits`
    (N,K).

    `success` and `logits` cost one forward pass more than the attack itself. An attack built with
    `lazy = True` defers that pass to the first access (in eval mode, without gradients, with the model as it is
    then), so callers that only need `adv`, like adversarial training, skip it: a PGD-10 call is then exactly ten
    forward/backward passes, the same work as torchattacks.
    """

    def __init__(
        self,
        adv: torch.Tensor,
        success: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        *,
        judge: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        if judge is None and (success is None or logits is None):
            raise TypeError("AttackResult needs success and logits, or a judge computing them")
        self.adv, self.eps = adv, eps
        self._success, self._logits, self._judge = success, logits, judge

    def _resolve(self) -> None:
        if self._logits is None or self._success is None:
            self._logits, self._success = self._judge()
            self._judge = None

    @property
    def success(self) -> torch.Tensor:
        self._resolve()
        return self._success

    @property
    def logits(self) -> torch.Tensor:
        self._resolve()
        return self._logits

    def __repr__(self) -> str:
        judged = "pending" if self._logits is None else f"{int(self._success.sum())} succeeded"
        return f"AttackResult(adv={tuple(self.adv.shape)}, eps={self.eps}, {judged})"


@dataclass(frozen=True)
class AttackParams:
    """One attack request in the terms all kinds share (the trainer's config, a probe, dissection, evaluation);
    each kind's `from_params` takes the parts it uses. Built into an attack by `registry.make_attack`."""

    eps: Eps = 8 / 255
    norm: str = "linf"
    steps: int | None = None  # iterations (Square: queries per image); None: the kind's registered default
    step_size: Eps | None = None  # None: the kind's default fraction of ε
    random_start: bool = True  # PGD
    restarts: int = 1  # PGD
    targeted: bool = False
    seed: int | None = None  # every random draw (PGD's start, ghost networks, Square's squares)
    ghosts: int = 2  # ghost-ensemble: ghost networks of the attacked model
    others: tuple[Predict, ...] = ()  # ghost-ensemble: other models averaged in beside the ghosts
    # True: each image's result depends only on that image and ε, whichever images share its batch (the
    # minimal-ε search needs this): PGD starts at the clean image, Square draws each image's squares alone.
    deterministic: bool = False


def expected_channels(model: object) -> int | None:
    """Input channels a model expects: the wrapper's normalisation buffer, else its first conv; None if unknown."""
    mean = getattr(model, "mean", None)
    if isinstance(mean, torch.Tensor) and mean.dim() == 4:
        return int(mean.shape[1])
    if isinstance(model, nn.Module):
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                return module.in_channels
    return None


def validate_batch(
    images: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None, channels: int | None, targeted: bool
) -> None:
    """Raise InvalidInput naming the field for every malformed argument of an attack call."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidInput("images", f"expected a (N, C, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise InvalidInput("images", f"expected floating point values in [0, 1], got dtype {images.dtype}")
    if channels is not None and images.shape[1] != channels:
        raise InvalidInput("images", f"model expects {channels} channels, got {images.shape[1]}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise InvalidInput("images", f"values must lie in [0, 1], got [{images.min():.3g}, {images.max():.3g}]")
    for field, value in (("labels", labels), ("target", target)):
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.shape != (images.shape[0],):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InvalidInput(field, f"expected shape ({images.shape[0]},) to match the images, got {shape}")
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise InvalidInput(field, f"expected integer class indices, got dtype {value.dtype}")
    if targeted and target is None:
        raise InvalidInput("target", "a targeted attack needs the class to reach for every sample")


def check_eps(eps: Eps, field: str = "eps") -> None:
    """ε (or a step size) must be finite and non-negative; a tensor means one value per sample."""
    value = torch.as_tensor(eps, dtype=torch.float64)
    if value.dim() > 1 or not torch.isfinite(value).all() or (value < 0).any():
        raise InvalidInput(field, f"must be a finite number >= 0 or a (N,) tensor of them, got {eps!r}")


def check_steps(steps: int, field: str = "steps") -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidInput(field, f"must be an integer >= 1, got {steps!r}")


def per_sample(value: Eps, x: torch.Tensor) -> torch.Tensor:
    """A float or (N,) tensor as an (N,1,1,1) tensor on x's device, so steps broadcast per sample."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if t.dim() == 1 and t.shape[0] != x.shape[0]:
        raise InvalidInput("eps", f"per-sample values need shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t.expand(x.shape[0]).reshape(-1, *([1] * (x.dim() - 1))).clone()


def class_loss(logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Per-sample loss the attack ascends: CE to the true label, or minus CE to the target when targeted."""
    if target is not None:
        return -F.cross_entropy(logits, target, reduction="none")
    return F.cross_entropy(logits, labels, reduction="none")


def succeeded(logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    pred = logits.argmax(1)
    return pred == target if target is not None else pred != labels


class Attack:
    """Base class: validates the call, runs `perturb` with every model in eval mode (flags restored in `finally`,
    even when the model raises), then judges the adversarial images on `self.model`.

    Subclasses set `self.model` (the model whose logits decide success), `self.eps`, `self.targeted`, and
    implement `perturb(images, labels, target) -> adv`.
    """

    model: Predict
    eps: Eps
    targeted: bool = False
    # Optional hook called with the step index before every step of the shared loop (`loop.iterate`); it may
    # raise to abandon the attack, e.g. when a caller's deadline passes. Set it on an instance after building.
    callback: Callable[[int], None] | None = None
    # True: judge the adversarial images (success, logits) only when the result is first asked for them.
    lazy: bool = False

    def __init__(self, model: Predict, eps: Eps, *, targeted: bool = False) -> None:
        check_eps(eps)
        self.model, self.eps, self.targeted = model, eps, targeted

    @classmethod
    def from_params(cls, model: Predict, params: AttackParams) -> Attack:
        """This kind built from the shared parameters (`params.steps` already resolved by the registry)."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from AttackParams")

    def models(self) -> Sequence[object]:
        """Every module whose training flag must be held in eval mode during the attack."""
        return [self.model]

    def channels(self) -> int | None:
        """Input channels the attacked model expects (None: unknown, not checked)."""
        return expected_channels(self.model)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None = None
    ) -> AttackResult:
        validate_batch(images, labels, target, self.channels(), self.targeted)
        if not self.targeted:
            target = None
        with self._eval_mode():
            adv = self.perturb(images, labels, target).detach()

        def judge() -> tuple[torch.Tensor, torch.Tensor]:
            with self._eval_mode(), torch.no_grad():
                logits = self.model(adv)
            return logits, succeeded(logits, labels, target)

        eps = per_sample(self.eps, images).flatten()
        if self.lazy:
            return AttackResult(adv, eps=eps, judge=judge)
        logits, success = judge()
        return AttackResult(adv, success, eps, logits)

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Every model of the attack in eval mode; each module's own flag restored on exit, also on errors."""
        with ExitStack() as stack:
            for m in self.models():
                if isinstance(m, nn.Module):
                    stack.enter_context(eval_mode(m))
            yield
