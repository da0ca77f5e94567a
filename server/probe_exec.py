"""One probe as both modes run it (in a worker process, or on the caller's thread when there are none), and the
plain data that crosses the pipe to a worker process: settings, tasks, answers.

Errors cross the pipe as themselves: the worker sends the exception object (domain errors pickle by their
fields) and the parent raises it again, with the worker's traceback as a note, so server/errors.py stays the
only table from errors to status codes. An exception that does not survive pickling arrives as a RuntimeError
naming its type and message (INTERNAL).
"""

from __future__ import annotations

import pickle
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from conceptlens.handlers.backends import ModelRuntime
from conceptlens.handlers.probe import probe
from conceptlens.handlers.trace import TraceOptions

from . import probe_encoding
from .errors import DeadlineExpired
from .jobs import ProbeJob


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


@dataclass(frozen=True)
class WorkerSettings:
    """Sent first on a new worker's pipe."""

    threads: int  # torch intra-op and ONNX Runtime intra-op threads
    threshold: float  # plausibility threshold of the traces
    niceness: int  # the worker's nice value
    preload: tuple[RuntimeRef, ...] = ()
    cpus: frozenset[int] = frozenset()  # pinned to these; empty: not pinned


@dataclass(frozen=True)
class Task:
    model: RuntimeRef
    job: ProbeJob  # job.attack.members are RuntimeRefs


Answer = tuple  # ("ok", ProbeOutput) or ("error", exception, worker traceback text)


def execute(runtime: ModelRuntime, job: ProbeJob, threshold: float, members: Sequence[ModelRuntime] = ()
            ) -> ProbeOutput:
    """Run one probe on loaded runtimes (`members`: the ghost-ensemble's other models). The results are encoded
    here (a millisecond per probe that the server's event loop no longer spends). Raises DeadlineExpired once
    `job.deadline` passes, ValueError (InvalidInput) from the attack library."""
    check = deadline_check(job.deadline)
    check()  # it may have passed while the job waited for a worker
    spec = replace(job.attack, members=tuple(members))
    options = TraceOptions(layers=job.layers, top_k_units=job.top_k_units, candidates=job.candidates)
    started = time.perf_counter()
    out = probe(runtime, job.images, spec, options, plausibility_threshold=threshold, check=check)
    seconds = time.perf_counter() - started
    return ProbeOutput([probe_encoding.result(item, runtime.classes, job.top_k, job.return_adversarial)
                        .SerializeToString() for item in out], seconds)


def deadline_check(deadline: float | None) -> Callable[[], None]:
    """Called between attack steps: yields the GIL (in-process mode: a probe's many small torch calls would
    otherwise keep the event loop waiting a switch interval at a time) and raises DeadlineExpired once
    `deadline` (time.monotonic(), CLOCK_MONOTONIC: the same clock in every process) has passed."""

    def check() -> None:
        time.sleep(0)
        if deadline is not None:
            now = time.monotonic()
            if now > deadline:
                raise DeadlineExpired(f"deadline passed {now - deadline:.3f}s ago during the probe; stopped")

    return check


def error_answer(err: BaseException) -> Answer:
    """A worker's answer for an error: the exception itself if it survives pickling, else a RuntimeError."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        err = RuntimeError(f"{type(err).__name__}: {err}")
    return ("error", err, traceback.format_exc())


def result(answer: Answer) -> ProbeOutput:
    """The parent's side: the output, or the worker's error raised again here."""
    if answer[0] == "ok":
        return answer[1]
    _, err, worker_traceback = answer
    err.add_note(f"--- probe worker traceback ---\n{worker_traceback}")
    raise err
