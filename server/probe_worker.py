"""The probe worker pool: probes run in worker processes, so a probe never holds the server's GIL.

A probe is hundreds of small torch calls. On a thread of the server process each call takes the GIL, and the
grpc.aio event loop and Predict's ONNX Runtime calls wait for it (measured: bench/README.md). So `ProbeWorkers`
runs them in `processes` worker processes, started with subprocess (a fresh interpreter, none of the server's
grpc or ORT threads) and made background work for the OS scheduler (server/scheduling.py), each with `threads`
torch and ONNX Runtime threads, each keeping the runtimes it has loaded from their bundle directories (keyed by
path and by the parent's runtime object, so a hot-reloaded bundle is loaded anew). The workers start with the
server, importing torch and loading the served models in the background, so the first probe pays neither.

The parent sends plain data (server/probe_exec.py: the ProbeJob, its models as `RuntimeRef`s) and gets back
the encoded results and the probe's compute time, or the error itself; metrics stay in the parent
(Runners.probe). The worker (server/probe_entry.py) runs handlers/probe.py, the same code as the in-process
mode, and checks the deadline between attack steps itself. A worker that dies fails its probe with
UNAVAILABLE (ProbeWorkerLost) and is replaced; one still busy HANG_GRACE_S past its probe's deadline is killed
and replaced. `processes=0` runs probes on the calling thread instead (niced, yielding the GIL between steps).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import queue
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import replace
from multiprocessing.connection import wait

from conceptlens.handlers.backends import ModelRuntime
from conceptlens.handlers.errors import ModelLoading

from .errors import DeadlineExpired
from .jobs import ProbeJob
from .probe_exec import Answer, ProbeOutput, RuntimeRef, Task, WorkerSettings, execute, result
from .scheduling import background_niceness, background_thread, nice_process, worker_cpus

log = logging.getLogger(__name__)

HANG_GRACE_S = 5.0  # a worker this long past its probe's deadline is stuck in one step: killed and replaced


class ProbeWorkerLost(ModelLoading):
    """The process running a probe exited under it (killed, out of memory). UNAVAILABLE: a new worker is
    starting, and a retry runs on it; but the probe itself may have killed the worker, so gRPC's automatic retry
    is told not to repeat it (the caller decides)."""

    retry_safe = False


class _Worker:
    """One worker process (the `index`-th of the pool) and the parent's end of its pipe. Started with subprocess,
    not multiprocessing's spawn, which would re-run the parent's main script in the worker (a script starting a
    BackgroundServer without a __main__ guard would then start servers recursively)."""

    def __init__(self, settings: WorkerSettings, index: int) -> None:
        self.index = index
        self.conn, child = multiprocessing.Pipe()
        code = "import sys; from conceptlens.server.probe_entry import worker_main; worker_main(int(sys.argv[1]))"
        # start_new_session: a session, so an autogroup, of its own from the start (server/scheduling.py)
        self.process = subprocess.Popen([sys.executable, "-P", "-c", code, str(child.fileno())],
                                        pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, start_new_session=True)
        child.close()
        nice_process(self.process.pid, settings.niceness)  # before it imports torch; its threads inherit this
        self.conn.send(settings)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def call(self, task: Task, deadline: float | None) -> Answer:
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
        self._settings = WorkerSettings(threads, threshold, background_niceness())
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
            background_thread()
            return execute(runtime, job, self._settings.threshold, job.attack.members)
        task = Task(self._ref(runtime),
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
        return result(answer)

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

    def _spawn(self, settings: WorkerSettings, index: int) -> None:  # under self._lock
        cpus = worker_cpus(index, settings.threads, self.pin)
        worker = _Worker(replace(settings, cpus=cpus), index)
        self._workers.append(worker)
        self._idle.put(worker)

    def _ref(self, runtime: ModelRuntime) -> RuntimeRef:
        with self._lock:
            token = self._tokens.setdefault(runtime, next(self._count))
        return RuntimeRef(str(runtime.bundle.root), runtime.name, runtime.version, token)
