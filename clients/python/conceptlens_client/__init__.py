"""ConceptLens Python client: a typed `Client` over the generated gRPC stubs (grpcio, protobuf, numpy, pillow;
no torch). The stubs in `conceptlens_client.v1` are generated from proto/conceptlens/v1 (`make proto`).

`Client`, `ServiceError` and `to_image` are imported on first use (PEP 562), so a program that needs only a
light submodule (the `conceptlens` command uses `conceptlens_client.pipes`) does not pay for grpc and numpy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Client", "ServiceError", "to_image"]

if TYPE_CHECKING:
    from .client import Client, ServiceError, to_image


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
