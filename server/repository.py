"""The model repository: `<root>/<name>/<numeric version>/` bundle directories (Triton's layout).

Every version found is validated with `load_bundle` and given a `ModelRuntime`; the highest loaded version is
the default. `refresh()` rescans: new or changed versions are validated off the event loop and then swapped in
with one assignment (readers always see a whole snapshot), vanished ones are dropped. A bundle that fails is
refused with a log line and `conceptlens_model_load_failures_total`, and is retried only when its files
change; every other model keeps serving.

A version that loaded is never dropped because its files went bad: it keeps serving from memory (logged and
counted as a load failure) until its directory is removed, the only way to unload a version (docs/design.md §9.1,
"Model repository"). Folders that cannot be a model or a version (hidden, a name the API refuses, a version
that is not a plain ASCII number) are skipped with one warning each, so they never stop a rescan.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from conceptlens.handlers.backends import ModelRuntime
from conceptlens.handlers.bundle import load_bundle
from conceptlens.handlers.errors import BundleError, ConceptLensError, InvalidInput, UnknownName

from . import validation
from .metrics import Metrics

log = logging.getLogger(__name__)

Signature = tuple[int, int, int]  # (files, total bytes, newest mtime_ns): changes while a bundle is being copied
UNREADABLE: Signature = (-1, -1, -1)  # a version directory we could not list: it fails to load, never matches
_VERSION = re.compile(r"[1-9][0-9]{0,17}")  # ASCII digits only (str.isdigit takes "²"), below 2**63 (int64 field)


@dataclass(frozen=True)
class Entry:
    runtime: ModelRuntime
    path: Path
    signature: Signature


class ModelRepository:
    """Loaded model versions by name. Read with `resolve`; change only through `refresh`."""

    def __init__(self, root: Path, metrics: Metrics, *, threads: int = 0, verify_onnx: bool = True,
                 ) -> None:
        self.root = Path(root)
        self.metrics = metrics
        self.threads = threads
        self.verify_onnx = verify_onnx
        self._models: MappingProxyType[str, MappingProxyType[int, Entry]] = MappingProxyType({})
        self._failed: dict[Path, Signature] = {}
        self._skipped: set[Path] = set()  # odd folders already warned about
        self._lock = asyncio.Lock()

    # --- reading -------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def resolve(self, name: str, version: int = 0) -> ModelRuntime:
        """The runtime of `name` at `version` (0 = latest). UnknownName (NOT_FOUND) lists what is served."""
        models = self._models  # one snapshot for the whole lookup
        if name not in models:
            raise UnknownName("model", name, models)
        versions = models[name]
        if version == 0:
            return versions[max(versions)].runtime
        if version not in versions:
            raise UnknownName(f"version of model {name!r}", str(version), [str(v) for v in versions])
        return versions[version].runtime

    # --- changing ------------------------------------------------------------------------------------------

    async def refresh(self) -> bool:
        """Rescan the root; returns whether the served set changed."""
        async with self._lock:
            found, unlisted = await asyncio.to_thread(self._scan)
            current = self._models
            # a model folder we could not list is not a removal: what it served keeps serving
            new: dict[str, dict[int, Entry]] = {name: dict(current[name]) for name in unlisted if name in current}
            changed = False
            for (name, version), (path, signature) in sorted(found.items()):
                old = current.get(name, {}).get(version)
                if old is not None and old.signature == signature:
                    new.setdefault(name, {})[version] = old
                    continue
                if self._failed.get(path) == signature:
                    entry = None  # refused before and unchanged since: not retried
                else:
                    entry = await asyncio.to_thread(self._load, name, version, path, signature, old is not None)
                if entry is not None:
                    new.setdefault(name, {})[version] = entry
                    changed = True
                elif old is not None:
                    new.setdefault(name, {})[version] = old  # keep serving the good copy we had, from memory
            gone = {(n, v) for n, vs in current.items() for v in vs} - {(n, v) for n, vs in new.items() for v in vs}
            for name, version in sorted(gone):
                log.info("model %s version %d removed from the repository", name, version)
                changed = True
            self._models = MappingProxyType({n: MappingProxyType(vs) for n, vs in new.items()})
            self._update_gauges(current, new)
        return changed

    def _scan(self) -> tuple[dict[tuple[str, int], tuple[Path, Signature]], set[str]]:
        """(version folders found with their signatures, names of model folders that could not be listed)."""
        found: dict[tuple[str, int], tuple[Path, Signature]] = {}
        unlisted: set[str] = set()
        if not self.root.is_dir():
            log.warning("model repository %s does not exist (yet)", self.root)
            return found, unlisted
        models = _subdirectories(self.root)
        if models is None:
            raise OSError(f"cannot list the model repository {self.root}")  # the poller keeps every model
        for model_dir in models:
            if not self._usable_name(model_dir):
                continue
            versions = _subdirectories(model_dir)
            if versions is None:
                unlisted.add(model_dir.name)
                continue
            for version_dir in versions:
                if self._usable_version(version_dir):
                    found[(model_dir.name, int(version_dir.name))] = (version_dir, _signature(version_dir))
        return found, unlisted

    def _usable_name(self, model_dir: Path) -> bool:
        """Whether a folder can hold a served model: not hidden, and a name the API accepts."""
        if model_dir.name.startswith("."):
            return False
        try:
            validation.model_name(model_dir.name)
        except InvalidInput as err:
            self._skip(model_dir, f"not a model name the API accepts ({err.problem})")
            return False
        return True

    def _usable_version(self, version_dir: Path) -> bool:
        """Whether a folder is a version: a positive plain decimal number. Exporters write into hidden
        temporary siblings, then rename; those are skipped silently."""
        if version_dir.name.startswith("."):
            return False
        if not _VERSION.fullmatch(version_dir.name):
            self._skip(version_dir, "a version folder is named by a positive decimal number (1, 2, ...)")
            return False
        return True

    def _skip(self, path: Path, why: str) -> None:
        if path not in self._skipped:  # once per folder, not once per poll
            self._skipped.add(path)
            log.warning("model repository: skipping %s: %s", path, why)

    def _load(self, name: str, version: int, path: Path, signature: Signature, serving: bool) -> Entry | None:
        try:
            if signature == UNREADABLE:
                raise BundleError(f"{path}: cannot list the version directory")
            bundle = load_bundle(path, verify_onnx=self.verify_onnx)
            runtime = ModelRuntime(bundle, threads=self.threads)
        except (ConceptLensError, OSError, RuntimeError, ValueError) as err:
            reason = err if isinstance(err, BundleError) else f"{type(err).__name__}: {err}"
            if serving:
                log.error("model %s version %d: its files changed and fail to load (%s); still serving the copy "
                          "loaded before, from memory (remove %s to unload it)", name, version, reason, path)
            else:
                log.error("refused model %s version %d: %s", name, version, reason)
            self.metrics.load_failures.labels(name).inc()
            self._failed[path] = signature
            return None
        if (bundle.manifest.name, bundle.manifest.version) != (name, version):
            log.warning("%s: manifest says %s v%d; serving it as %s v%d (the directory decides)", path,
                        bundle.manifest.name, bundle.manifest.version, name, version)
        runtime.name, runtime.version = name, version
        self._failed.pop(path, None)
        log.info("serving %r", runtime)
        return Entry(runtime, path, signature)

    def _update_gauges(self, old: dict, new: dict) -> None:
        for name in set(old) | set(new):
            versions = new.get(name, {})
            self.metrics.model_loaded.labels(name).set(1 if versions else 0)
            self.metrics.model_version.labels(name).set(max(versions) if versions else 0)


def _subdirectories(directory: Path) -> list[Path] | None:
    """The folders in `directory`; None when it cannot be listed (unreadable, or removed while we looked)."""
    try:
        return [child for child in directory.iterdir() if child.is_dir()]
    except FileNotFoundError:
        return []
    except OSError as err:
        log.warning("model repository: cannot list %s: %s", directory, err)
        return None


def _signature(directory: Path) -> Signature:
    files = total = newest = 0
    try:
        entries = list(directory.iterdir())
    except OSError:
        return UNREADABLE
    for file in entries:
        try:
            stat = file.stat()
        except FileNotFoundError:  # removed while we looked: the next scan sees the new state
            continue
        except OSError:
            return UNREADABLE
        files, total, newest = files + 1, total + stat.st_size, max(newest, stat.st_mtime_ns)
    return files, total, newest
