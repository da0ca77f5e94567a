"""Where probes run: in worker processes, so a probe never holds the server's GIL.

A probe is hundreds of small torch calls. On a thread of the server process each call takes the GIL, and the
grpc.aio event loop and Predict's ONNX Runtime calls wait for it (Predict p99 ×2.75 beside probes on 2 cores,
niced thread and GIL yields between steps included). So `ProbeWorkers` runs them in `processes` worker processes
(spawn: a fresh interpreter, none of the server's grpc or ORT threads), each background work to the scheduler
(a session and autogroup of its own, niced +10, pinned to its own CPUs: `_background`), with `threads` torch and
ONNX Runtime threads, each keeping the runtimes it has loaded from their bundle directories (keyed by path and
by the parent's runtime object, so a hot-reloaded bundle is loaded anew). The workers start with the server,
importing torch and loading the served models in the background, so the first probe pays neither.

The parent sends plain data (the ProbeJob, its models as `RuntimeRef`s) and gets back the ImageProbes and the
probe's compute time, or the error as data; metrics stay in the parent (Runners.probe). The worker runs
handlers/probe.py, the same code as the in-process mode, and checks the deadline between attack steps itself
(time.monotonic is CLOCK_MONOTONIC, shared by processes on Linux). A worker that dies fails its probe with
UNAVAILABLE (ProbeWorkerLost) and is replaced; one still busy HANG_GRACE_S past its probe's deadline is killed
and replaced. `processes=0` runs probes on the calling thread instead (niced, yielding the GIL between steps).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from multiprocessing.connection import Connection, wait

from conceptlens.handlers.allocator import tune_allocator
from conceptlens.handlers.backends import ModelRuntime
from conceptlens.handlers.bundle import load_bundle
from conceptlens.handlers.errors import BundleError, InvalidInput, ModelLoading
from conceptlens.handlers.probe import ProbeSpec, probe
from conceptlens.handlers.trace import TraceOptions

from . import probe_encoding
from .errors import DeadlineExpired
from .jobs import ProbeJob

log = logging.getLogger(__name__)

PROBE_NICE = 10  # niceness added to probe work: Predict's threads win the cores on a busy machine
HANG_GRACE_S = 5.0  # a worker this long past its probe's deadline is stuck in one step: killed and replaced
CACHE_SIZE = 8  # runtimes a worker keeps; a ghost-ensemble probe uses 1 + max_probe_members (4) at once
SPIN_S = 0.1  # after a probe, a worker polls for the next one this long before it blocks: see _next_task


class ProbeWorkerLost(ModelLoading):
    """The process running a probe exited under it (killed, out of memory). UNAVAILABLE: a new worker is
    starting, and a retry runs on it."""


@dataclass(frozen=True)
class RuntimeRef:
    """A served model version as a worker loads it: bundle directory, the name and version it is served as,
    and a token for the parent's runtime object (a reloaded bundle is a new object, so a new token)."""

    path: str
    name: str
    version: int
    token: int


@dataclass(frozen=True)
class ProbeOutput:
    results: list[bytes]  # serialized ProbeResult messages, one per image
    seconds: float  # attack and tracing time, without encoding, queueing or transfer


def execute(runtime: ModelRuntime, job: ProbeJob, threshold: float, members: Sequence[ModelRuntime] = ()
            ) -> ProbeOutput:
    """Run one probe on loaded runtimes (`members`: the ghost-ensemble's other models): the code both modes
    share. The results are encoded here (a millisecond per probe that the server's event loop no longer spends).
    Raises DeadlineExpired once `job.deadline` passes, ValueError (InvalidInput) from the attack library."""
    check = deadline_check(job.deadline)
    check()  # it may have passed while the job waited for a worker
    spec = ProbeSpec(**{f.name: getattr(job.attack, f.name) for f in fields(job.attack)} | {"members": tuple(members)})
    options = TraceOptions(layers=job.layers, top_k_units=job.top_k_units, candidates=job.candidates)
    started = time.perf_counter()
    out = probe(runtime, job.images, spec, options, plausibility_threshold=threshold, check=check)
    seconds = time.perf_counter() - started
    return ProbeOutput([probe_encoding.result(item, runtime.classes, job.top_k, job.return_adversarial)
                        .SerializeToString() for item in out], seconds)


def deadline_check(deadline: float | None) -> Callable[[], None]:
    """Called between attack steps: yields the GIL (in-process mode: a probe's many small torch calls would
    otherwise keep the event loop waiting a switch interval at a time) and raises DeadlineExpired once
    `deadline` (time.monotonic()) has passed."""

    def check() -> None:
        time.sleep(0)
        if deadline is not None:
            now = time.monotonic()
            if now > deadline:
                raise DeadlineExpired(f"deadline passed {now - deadline:.3f}s ago during the probe; stopped")

    return check


def background_priority() -> None:
    """In-process mode: lower the calling thread's CPU priority (Linux nices threads one by one). Once per
    thread; silently skipped where not permitted."""
    tid = threading.get_native_id()
    if tid in _NICED or not hasattr(os, "setpriority"):
        return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + PROBE_NICE))
    _NICED.add(tid)


_NICED: set[int] = set()


# --- the parent's side -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    threads: int  # torch intra-op and ONNX Runtime intra-op threads
    threshold: float  # plausibility threshold of the traces
    priority: int  # the workers' nice value
    preload: tuple[RuntimeRef, ...] = ()
    cpus: frozenset[int] = frozenset()  # pinned to these; empty: not pinned


@dataclass(frozen=True)
class _Task:
    model: RuntimeRef
    job: ProbeJob  # attack.members are RuntimeRefs


class _Worker:
    """One worker process (the `index`-th of the pool) and the parent's end of its pipe. Started with subprocess,
    not multiprocessing's spawn, which would re-run the parent's main script in the worker (a script starting a
    BackgroundServer without a __main__ guard would then start servers recursively)."""

    def __init__(self, settings: _Settings, index: int) -> None:
        self.index = index
        self.conn, child = multiprocessing.Pipe()
        code = "import sys; from conceptlens.server.probe_worker import worker_main; worker_main(int(sys.argv[1]))"
        # start_new_session: a session, so an autogroup, of its own from the start (see _background)
        self.process = subprocess.Popen([sys.executable, "-P", "-c", code, str(child.fileno())],
                                        pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, start_new_session=True)
        child.close()
        # Nice the new process before it imports torch (its main thread; threads it starts inherit this).
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, self.process.pid, settings.priority)
        self.conn.send(settings)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def call(self, task: _Task, deadline: float | None) -> tuple:
        """Send one task and wait for the answer (the wait releases the GIL). Raises ProbeWorkerLost when the
        process dies (its end of the pipe closes), TimeoutError when it is still busy HANG_GRACE_S after
        `deadline`."""
        try:
            self.conn.send(task)
            timeout = None if deadline is None else max(0.0, deadline + HANG_GRACE_S - time.monotonic())
            ready = wait([self.conn], timeout)
            if ready:
                return self.conn.recv()
        except (EOFError, OSError):  # OSError: BrokenPipeError, ConnectionResetError
            ready = [self.conn]
        if not ready:
            raise TimeoutError(f"still busy {HANG_GRACE_S:.0f}s past the probe's deadline")
        raise ProbeWorkerLost(f"the probe worker process (pid {self.pid}) {self.exit_reason()} during this probe; "
                              "a new one is starting, retry")

    def exit_reason(self) -> str:
        try:
            code = self.process.wait(1.0)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def stop(self, timeout: float) -> None:
        for end in (self.process.terminate, self.process.kill):
            if self.process.poll() is None:
                end()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout)
        self.conn.close()


class ProbeWorkers:
    """The probe worker processes of one server (`processes=0`: probes run on the caller's thread). `run` is
    called from the probe batchers' executor threads and blocks until its probe is done."""

    def __init__(self, processes: int = 1, threads: int = 1, threshold: float = 0.5, *, pin: bool = True) -> None:
        self.processes = processes
        self.pin = pin
        base = os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0
        self._settings = _Settings(threads, threshold, min(19, base + PROBE_NICE))
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._tokens: weakref.WeakKeyDictionary[ModelRuntime, int] = weakref.WeakKeyDictionary()
        self._count = itertools.count(1)

    def start(self, preload: Sequence[ModelRuntime] = ()) -> None:
        """Start the worker processes without waiting for them: each imports torch and loads `preload`."""
        settings = replace(self._settings, preload=tuple(self._ref(r) for r in preload))
        with self._lock:
            free = sorted(set(range(self.processes)) - {w.index for w in self._workers})
            for index in free if not self._closed else ():
                self._spawn(settings, index)

    def pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._workers]

    @property
    def busy(self) -> int:
        """Workers running a probe now."""
        return len(self._workers) - self._idle.qsize()

    def run(self, runtime: ModelRuntime, job: ProbeJob) -> ProbeOutput:
        """Probe on a worker (or here when processes=0). Raises as `execute` does, and ProbeWorkerLost."""
        if self.processes == 0:
            background_priority()
            return execute(runtime, job, self._settings.threshold, job.attack.members)
        task = _Task(self._ref(runtime),
                     replace(job, attack=replace(job.attack, members=tuple(map(self._ref, job.attack.members)))))
        worker = self._take(job.deadline)
        try:
            answer = worker.call(task, job.deadline)
        except (ProbeWorkerLost, TimeoutError) as err:
            log.warning("probe worker pid %s replaced: %s", worker.pid, err)
            self._replace(worker)
            if isinstance(err, TimeoutError):
                raise DeadlineExpired(f"the probe was still running {HANG_GRACE_S:.0f}s past its deadline; its "
                                      "worker was restarted") from None
            raise
        except BaseException:  # e.g. a task that does not pickle: the pipe's state is unknown, start afresh
            self._replace(worker)
            raise
        self._idle.put(worker)
        return _unpack(answer)

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after `timeout`); probes still running fail."""
        with self._lock:
            self._closed = True
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.stop(timeout)

    def _take(self, deadline: float | None) -> _Worker:
        self.start()  # no-op once started; spawns lazily when start() was never called
        while True:
            if self._closed:
                raise ModelLoading("the server is stopping; probe workers are shut down")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExpired("deadline passed while the probe waited for a free probe worker")
            try:
                worker = self._idle.get(timeout=min(1.0, remaining) if remaining is not None else 1.0)
            except queue.Empty:
                continue
            if worker.alive():
                return worker
            log.warning("idle probe worker pid %s %s; starting a new one", worker.pid, worker.exit_reason())
            self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.stop(1.0)
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
            if not self._closed:
                self._spawn(self._settings, worker.index)

    def _spawn(self, settings: _Settings, index: int) -> None:  # under self._lock
        worker = _Worker(replace(settings, cpus=self._cpus(index)), index)
        self._workers.append(worker)
        self._idle.put(worker)

    def _cpus(self, index: int) -> frozenset[int]:
        """Worker `index`'s CPUs: `threads` of them counted from the end of the allowed set (the server's threads
        tend to start at the front), none when pinning is off or there are not more CPUs than that."""
        allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        threads = self._settings.threads
        if not self.pin or len(allowed) <= threads:
            return frozenset()
        return frozenset(allowed[-1 - (index * threads + j) % len(allowed)] for j in range(threads))

    def _ref(self, runtime: ModelRuntime) -> RuntimeRef:
        with self._lock:
            token = self._tokens.setdefault(runtime, next(self._count))
        return RuntimeRef(str(runtime.bundle.root), runtime.name, runtime.version, token)


def _unpack(answer: tuple) -> ProbeOutput:
    """A worker's answer back into a result or the error it stood for."""
    kind, *rest = answer
    if kind == "ok":
        return rest[0]
    if kind == "invalid":
        raise InvalidInput(*rest)
    if kind == "deadline":
        raise DeadlineExpired(rest[0])
    if kind == "value":
        raise ValueError(rest[0])
    if kind == "bundle":
        raise BundleError(rest[0])
    raise RuntimeError(f"probe worker: {rest[0]}\n--- worker traceback ---\n{rest[1]}")  # INTERNAL, logged


# --- the worker's side -------------------------------------------------------------------------------------


class _Runtimes:
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
    _serve(conn, conn.recv())


def _serve(conn: Connection, settings: _Settings) -> None:
    """A worker process's main loop: one task at a time until the pipe closes or the parent stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us; Ctrl-C is its to handle
    _background(settings)
    tune_allocator()  # PGD's many small backward passes would otherwise fault their buffers in afresh each step
    import torch

    torch.set_num_threads(settings.threads)
    runtimes = _Runtimes(settings.threads)
    for ref in settings.preload:
        with contextlib.suppress(Exception):  # a bundle that fails here fails its probes later, with the reason
            runtimes.get(ref)
    while True:
        try:
            task = _next_task(conn, SPIN_S)
            if task is None:
                return
            conn.send(_answer(runtimes, task, settings.threshold))
        except (EOFError, OSError):  # the server is gone
            return


def _next_task(conn: Connection, spin_s: float) -> _Task | None:
    """The next task, polling the pipe for up to `spin_s` before blocking on it. A worker whose CPU falls idle
    between the probes of a stream, and is woken for each next one, costs Predict tail latency on the other
    cores; polling keeps it busy across such gaps (at its background priority) and blocks once probes stop, as
    ONNX Runtime's spinning threads do. Measured on 2 cores with one-image FGSM probes at 7/s
    (bench/probe.py's p99 method): Predict p99 x1.25-1.32 with a worker that blocks at once, x1.09-1.20 with
    one that never blocks."""
    end = time.monotonic() + spin_s
    while time.monotonic() < end and not conn.poll(0):
        pass
    return conn.recv()


def _background(settings: _Settings) -> None:
    """Make this process background work on Linux; each step silently skipped where not permitted. Measured on
    2 cores (bench/probe.py): each step lowers Predict p99 beside probes, none alone is enough.
    - A session of its own (the parent starts it so), hence an autogroup of its own, niced: with autogroups on
      (most desktop and VM kernels), CFS shares the CPU between groups first, so a worker in the server's group
      would spend the server's share however niced it is.
    - The process niced (settings.priority): what counts where autogroups are off (containers' cgroups).
    - Pinned to its own CPUs (settings.cpus): the scheduler then leaves the other cores to the server's threads
      instead of spreading probe work over them."""
    with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as autogroup:
        autogroup.write(str(settings.priority))
    with contextlib.suppress(OSError, AttributeError):  # again, in case the parent's early call came late
        os.setpriority(os.PRIO_PROCESS, 0, settings.priority)
    if settings.cpus:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setaffinity(0, settings.cpus)


def _answer(runtimes: _Runtimes, task: _Task, threshold: float) -> tuple:
    """The task's result, or its error as plain data (InvalidInput does not survive pickling)."""
    try:
        deadline_check(task.job.deadline)()
        runtime = runtimes.get(task.model)
        members = [runtimes.get(ref) for ref in task.job.attack.members]
        return ("ok", execute(runtime, task.job, threshold, members))
    except InvalidInput as err:
        return ("invalid", err.field, err.problem)
    except DeadlineExpired as err:
        return ("deadline", str(err))
    except ValueError as err:
        return ("value", str(err))
    except BundleError as err:
        return ("bundle", str(err))
    except Exception as err:
        return ("error", f"{type(err).__name__}: {err}", traceback.format_exc())
