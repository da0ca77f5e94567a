"""A probe worker process's entry point and loop: `worker_main(fd)` reads its settings from the pipe, makes itself
background work (server/scheduling.py), imports torch, loads the models to preload, then answers one task at a
time until the pipe closes. The parent's side is server/probe_worker.py."""

from __future__ import annotations

import contextlib
import signal
import time
from collections import OrderedDict
from multiprocessing.connection import Connection

from conceptlens.handlers.allocator import tune_allocator
from conceptlens.handlers.backends import ModelRuntime
from conceptlens.handlers.bundle import load_bundle

from .probe_exec import Answer, RuntimeRef, Task, WorkerSettings, deadline_check, error_answer, execute
from .scheduling import background_process

CACHE_SIZE = 8  # runtimes a worker keeps; a ghost-ensemble probe uses 1 + max_probe_members (4) at once
SPIN_S = 0.1  # after a probe, a worker polls for the next one this long before it blocks: see next_task


class Runtimes:
    """The runtimes a worker has loaded, by bundle path; a new parent token means a reloaded bundle."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._cache: OrderedDict[str, tuple[int, ModelRuntime]] = OrderedDict()

    def get(self, ref: RuntimeRef) -> ModelRuntime:
        hit = self._cache.get(ref.path)
        if hit is None or hit[0] != ref.token:
            runtime = ModelRuntime(load_bundle(ref.path, verify_onnx=False), threads=self.threads)  # checked at load
            runtime.name, runtime.version = ref.name, ref.version
            hit = self._cache[ref.path] = (ref.token, runtime)
        self._cache.move_to_end(ref.path)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return hit[1]


def worker_main(fd: int) -> None:
    """A worker process's entry point: `fd` is its end of the pipe; the settings come first on it."""
    conn = Connection(fd)
    serve(conn, conn.recv())


def serve(conn: Connection, settings: WorkerSettings) -> None:
    """The main loop: one task at a time until the pipe closes or the parent stops the process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us; Ctrl-C is its to handle
    background_process(settings.niceness, settings.cpus)
    tune_allocator()  # PGD's many small backward passes would otherwise fault their buffers in afresh each step
    import torch

    torch.set_num_threads(settings.threads)
    runtimes = Runtimes(settings.threads)
    for ref in settings.preload:
        with contextlib.suppress(Exception):  # a bundle that fails here fails its probes later, with the reason
            runtimes.get(ref)
    while True:
        try:
            task = next_task(conn, SPIN_S)
            if task is None:
                return
            conn.send(answer(runtimes, task, settings.threshold))
        except (EOFError, OSError):  # the server is gone
            return


def next_task(conn: Connection, spin_s: float) -> Task | None:
    """The next task, polling the pipe for up to `spin_s` before blocking on it. A worker whose CPU falls idle
    between the probes of a stream, and is woken for each next one, costs Predict tail latency on the other
    cores; polling keeps it busy across such gaps (at its background priority) and blocks once probes stop, as
    ONNX Runtime's spinning threads do (measurements: bench/README.md)."""
    end = time.monotonic() + spin_s
    while time.monotonic() < end and not conn.poll(0):
        pass
    return conn.recv()


def answer(runtimes: Runtimes, task: Task, threshold: float) -> Answer:
    """The task's result, or its error (see probe_exec: errors cross the pipe as themselves)."""
    try:
        deadline_check(task.job.deadline)()
        runtime = runtimes.get(task.model)
        members = [runtimes.get(ref) for ref in task.job.attack.members]
        return ("ok", execute(runtime, task.job, threshold, members))
    except Exception as err:
        return error_answer(err)
