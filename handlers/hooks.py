"""Activation capture and overriding through forward hooks, always removed in `finally`.

One `capture()` serves tracing, dissection and the consistency loss (habit borrowed from Captum's
`_forward_layer_distributed_eval`: register inside the context, remove every handle on the way out).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from .zoo import resolve_layer


@contextmanager
def capture(model: nn.Module, names: Sequence[str], *, detach: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of each named layer on every forward pass inside the context.

    `names` are dotted module names as listed by `zoo.layer_names(model)`. The dict is filled as the model
    runs; a later forward pass overwrites earlier entries. With `detach=False` the tensors stay in the
    autograd graph (the consistency loss and gradient tracing need that).
    """
    store: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        for name in names:
            module = resolve_layer(model, name)
            handle = module.register_forward_hook(_keeper(store, name, detach))
            stack.callback(handle.remove)
        yield store


@contextmanager
def override(model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the output of layer `name` by `fn(output)` for forward passes inside the context."""
    module = resolve_layer(model, name)
    handle = module.register_forward_hook(lambda _m, _i, out: fn(out))
    try:
        yield
    finally:
        handle.remove()


def _keeper(store: dict[str, torch.Tensor], name: str, detach: bool) -> Callable:
    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        store[name] = output.detach() if detach else output

    return hook
