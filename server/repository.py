"""The model repository: `<root>/<name>/<numeric version>/` bundle directories (Triton's layout).

Every version found is validated with `load_bundle` and given a `ModelRuntime`; the highest loaded version is
the default. `refresh()` rescans: new or changed versions are validated off the event loop and then swapped in
with one assignment (readers always see a whole snapshot), vanished ones are dropped. A bundle that fails is
refused with a log line and `conceptlens_model_load_failures_total`, and is retried only when its files
change; every other model keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from conceptlens.handlers.backends import ModelRuntime
from conceptlens.handlers.bundle import load_bundle
from conceptlens.handlers.errors import BundleError, ConceptLensError, UnknownName

from .metrics import Metrics

log = logging.getLogger(__name__)

Signature = tuple[int, int, int]  # (files, total bytes, newest mtime_ns): changes while a bundle is being copied


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
            found = await asyncio.to_thread(self._scan)
            current = self._models
            new: dict[str, dict[int, Entry]] = {}
            changed = False
            for (name, version), (path, signature) in sorted(found.items()):
                old = current.get(name, {}).get(version)
                if old is not None and old.signature == signature:
                    new.setdefault(name, {})[version] = old
                    continue
                if self._failed.get(path) == signature:
                    continue  # refused before and unchanged since
                entry = await asyncio.to_thread(self._load, name, version, path, signature)
                if entry is not None:
                    new.setdefault(name, {})[version] = entry
                    changed = True
                elif old is not None:
                    new.setdefault(name, {})[version] = old  # keep serving the good copy we had
            gone = {(n, v) for n, vs in current.items() for v in vs} - {(n, v) for n, vs in new.items() for v in vs}
            for name, version in sorted(gone):
                log.info("model %s version %d removed from the repository", name, version)
                changed = True
            self._models = MappingProxyType({n: MappingProxyType(vs) for n, vs in new.items()})
            self._update_gauges(current, new)
        return changed

    def _scan(self) -> dict[tuple[str, int], tuple[Path, Signature]]:
        found: dict[tuple[str, int], tuple[Path, Signature]] = {}
        if not self.root.is_dir():
            log.warning("model repository %s does not exist (yet)", self.root)
            return found
        for model_dir in self.root.iterdir():
            if not model_dir.is_dir() or model_dir.name.startswith("."):
                continue
            for version_dir in model_dir.iterdir():
                if not version_dir.is_dir() or not version_dir.name.isdigit() or int(version_dir.name) < 1:
                    continue  # exporters write into hidden temporary siblings, then rename
                found[(model_dir.name, int(version_dir.name))] = (version_dir, _signature(version_dir))
        return found

    def _load(self, name: str, version: int, path: Path, signature: Signature) -> Entry | None:
        try:
            bundle = load_bundle(path, verify_onnx=self.verify_onnx)
            runtime = ModelRuntime(bundle, threads=self.threads)
        except (ConceptLensError, OSError, RuntimeError, ValueError) as err:
            reason = err if isinstance(err, BundleError) else f"{type(err).__name__}: {err}"
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


def _signature(directory: Path) -> Signature:
    files = total = newest = 0
    for file in directory.iterdir():
        try:
            stat = file.stat()
        except FileNotFoundError:  # removed while we looked: the next scan sees the new state
            continue
        files, total, newest = files + 1, total + stat.st_size, max(newest, stat.st_mtime_ns)
    return files, total, newest
