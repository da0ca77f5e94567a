"""Domain errors. They know nothing of gRPC or the CLI: `server/errors.py` and `conceptlens/cli.py` are the
one place each that maps them to a status code or an exit code."""

from __future__ import annotations

from collections.abc import Iterable


class ConceptLensError(Exception):
    """Base of every error the project raises on purpose."""


class InvalidInput(ConceptLensError, ValueError):
    """A value given by the caller is wrong. `field` names it, `problem` says what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def __reduce__(self) -> tuple:  # pickled by its fields (errors cross the probe workers' pipe as they are)
        return type(self), (self.field, self.problem)


class UnknownName(ConceptLensError, LookupError):
    """A name (architecture, layer, attack, model, dataset...) that is not registered."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]) -> None:
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        shown = ", ".join(self.valid[:40]) + (f", ... ({len(self.valid)} in all)" if len(self.valid) > 40 else "")
        super().__init__(f"unknown {kind} {name!r}; valid: {shown}")

    def __str__(self) -> str:  # LookupError would quote the message
        return self.args[0]

    def __reduce__(self) -> tuple:
        return type(self), (self.kind, self.name, self.valid)


class BundleError(ConceptLensError):
    """A model bundle that fails its hashes, schema or output check."""


class ModelLoading(ConceptLensError):
    """The model exists but is not ready yet (loading or draining)."""


class QueueFull(ConceptLensError):
    """A bounded queue or a server-side cap refused the work."""
