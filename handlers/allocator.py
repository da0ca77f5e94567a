"""Keep freed tensor memory in the process instead of handing it back to the OS after every op (glibc only).

glibc's malloc serves blocks above its *dynamic* mmap threshold with fresh mmap() calls and unmaps them on free,
so every forward pass on CPU faults its activation buffers in again, page by page, zero-filled by the kernel,
and whether a process lands in the slow or the fast mode depends on the order of its first frees (measured:
bench/README.md, "CPU allocator"). This is the effect jemalloc or tcmalloc are usually LD_PRELOADed for on
CPU inference; three mallopt() calls get it without a new dependency.

`tune_allocator()` is called by the entry points that run torch on CPU (the `conceptlens` command and the
probe worker); library users call it themselves. It respects an operator's own `MALLOC_*_` or `GLIBC_TUNABLES`
settings, and is a no-op where there is no glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling on 64-bit
# ...and blocks at or above that ceiling would still be mmapped afresh on every allocation: a batch of 64 images of
# 64 px has 33.5 MB activations (small_cnn's first layer), ~400,000 page faults per PGD training step
# (bench/README.md). No mmap at all keeps them in the heap too; glibc still maps what a heap cannot hold.
MMAP_MAX = 0
TRIM_THRESHOLD = 1 << 30  # free heap top kept up to 1 GiB before it is returned to the OS
_OPERATOR_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_",
                      "LD_PRELOAD")
_done = False


def tune_allocator() -> bool:
    """Keep freed blocks of every size in glibc's heap: no mmap()ed blocks, a 1 GiB trim threshold (once per
    process). True when this is set now or was before."""
    global _done
    if _done:
        return True
    if any(os.environ.get(name) for name in _OPERATOR_SETTINGS):
        log.debug("allocator: left as configured by the environment")
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # no glibc here
        return False
    _done = all(mallopt(option, value) for option, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                             (_M_MMAP_MAX, MMAP_MAX),
                                                             (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    return _done
