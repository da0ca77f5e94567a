"""ConceptLens Python client: a typed `Client` over the generated gRPC stubs (grpcio, protobuf, numpy, pillow;
no torch). The stubs in `conceptlens_client.v1` are generated from proto/conceptlens/v1 (`make proto`)."""

from .client import Client, ServiceError, to_image

__all__ = ["Client", "ServiceError", "to_image"]
