"""ConceptLens: predictions that come with the units that caused them, what those units mean, and how easily
an attacker could flip them. Subpackages: `handlers` (model runtime), `training` (offline), `server` (gRPC)."""

__version__ = "0.1.0"
