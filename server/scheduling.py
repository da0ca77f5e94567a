"""How probe work is made background work for the OS scheduler (Linux; every step silently skipped where the
platform or the container does not permit it). Why each step: bench/README.md, "probes beside Predict"."""

from __future__ import annotations

import contextlib
import os
import threading

PROBE_NICE = 10  # niceness added to probe work: Predict's threads win the cores on a busy machine

_NICED: set[int] = set()


def background_niceness() -> int:
    """The nice value probe work runs at: this process's own plus PROBE_NICE (at most 19)."""
    base = os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0
    return min(19, base + PROBE_NICE)


def background_thread() -> None:
    """In-process mode: lower the calling thread's CPU priority (Linux nices threads one by one). Once per
    thread."""
    tid = threading.get_native_id()
    if tid in _NICED or not hasattr(os, "setpriority"):
        return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + PROBE_NICE))
    _NICED.add(tid)


def nice_process(pid: int, niceness: int) -> None:
    """Nice another process (the parent does this to a new worker before it imports torch)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, pid, niceness)


def background_process(niceness: int, cpus: frozenset[int]) -> None:
    """Make the calling process background work. Each step lowers Predict's p99 beside probes; none alone is
    enough:
    - a session of its own (the parent starts it so), hence an autogroup of its own, niced: with autogroups on
      (most desktop and VM kernels), CFS shares the CPU between groups first, so a worker in the server's group
      would spend the server's share however niced it is;
    - the process niced: what counts where autogroups are off (containers' cgroups);
    - pinned to its own CPUs (`cpus`, empty: not pinned): the scheduler then leaves the other cores to the
      server's threads instead of spreading probe work over them."""
    with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as autogroup:
        autogroup.write(str(niceness))
    nice_process(0, niceness)  # again, in case the parent's early call came late
    if cpus:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setaffinity(0, cpus)


def worker_cpus(index: int, threads: int, pin: bool) -> frozenset[int]:
    """Worker `index`'s CPUs: `threads` of them counted from the end of the allowed set (the server's threads
    tend to start at the front); none when pinning is off or there are not more CPUs than that."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not pin or len(allowed) <= threads:
        return frozenset()
    return frozenset(allowed[-1 - (index * threads + j) % len(allowed)] for j in range(threads))
