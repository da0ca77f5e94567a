"""Write a directory so that readers see either the old one or the whole new one, never a half-written one:
build it in a hidden sibling, then swap it into place (a failure leaves `out` as it was and removes the sibling)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replace_dir(out: Path) -> Iterator[Path]:
    """Yield an empty directory to fill; on a clean exit it replaces `out` (readable by others, as a run or
    bundle read by the server's user must be)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
