"""Dynamic batching: one bounded queue per (model, method), drained by worker tasks that run the model off the
event loop (a blocking call inside a `grpc.aio` handler would stall every other call).

A batch closes when it holds `max_batch` images or when its oldest request has waited `max_delay_s`, whichever
comes first (Triton's dynamic batcher), or at once when no other caller is waiting on this queue: nothing more
can join, and a lone caller should not pay the delay. A request with more images than `max_batch` runs as a
batch of its own.
Admission: a request that could not start before its deadline (the running batches and the full batches queued
ahead of it, at the moving average of recent batch times), that would wait more than `max_queue_batches` batch
times however long its deadline (so that what is admitted stays fast under overload: a queue that is always full
only adds latency, not throughput), or that finds the queue full is refused at once with Overloaded
(RESOURCE_EXHAUSTED with a retry hint), rather than queued to expire. `check_admission` makes the same
decision before the servicer decodes the images. Requests whose deadline passed while queued are failed with
DeadlineExpired without running; requests whose caller went away (cancelled futures) are skipped.
Each batcher owns its executor, so a slow method (Probe) cannot take the threads of a fast one (Predict).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .config import BatchConfig
from .errors import DeadlineExpired, Overloaded
from .metrics import Metrics

log = logging.getLogger(__name__)

P = TypeVar("P")  # one request's payload
R = TypeVar("R")  # one request's result
# fn(key, payloads) -> one result per payload, in order (an exception instance as a result fails only that
# caller). Runs on an executor thread. `key` groups requests that
# may share a batch (the model runtime they resolved to: versions never mix).
BatchFn = Callable[[Any, Sequence[P]], Sequence[R]]


@dataclass
class _Item(Generic[P]):
    key: Any
    payload: P
    size: int
    deadline: float | None  # time.monotonic() seconds; None = no deadline
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


class Batcher(Generic[P, R]):
    """The queue and workers of one (model, method)."""

    def __init__(self, model: str, method: str, fn: BatchFn, config: BatchConfig, metrics: Metrics) -> None:
        self.model, self.method, self.fn, self.config, self.metrics = model, method, fn, config, metrics
        self._items: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(config.workers, thread_name_prefix=f"{method}-{model}")
        self._workers = [asyncio.create_task(self._work(), name=f"batcher-{method}-{model}-{i}")
                         for i in range(config.workers)]
        self._depth = metrics.queue_depth.labels(model, method)
        self._outstanding = 0  # callers inside submit(): queued, running, or about to receive their result
        self._batch_s = 0.0  # moving average of one batch's run time (0 until the first batch ran)
        self._running: list[float] = []  # start times of the batches running now

    def expected_start_s(self) -> float:
        """Seconds until a request arriving now would start running: the rest of the running batches when every
        worker is busy, then the full batches queued ahead of it (it may join the last, partial one), at the
        recent batch time."""
        if self._batch_s == 0.0:
            return 0.0
        now = time.monotonic()
        workers = self.config.workers
        busy = 0.0
        if len(self._running) >= workers:
            busy = max(0.0, min(self._batch_s - (now - t) for t in self._running))
        ahead = sum(item.size for item in self._items)
        return busy + (ahead // self.config.max_batch) * self._batch_s / workers

    def check_admission(self, deadline: float | None) -> None:
        """Raise Overloaded when a request would find the queue full or could not start before `deadline`
        (time.monotonic()). Cheap: called before decoding and again when queuing."""
        if len(self._items) >= self.config.queue_size:
            self.metrics.rejected.labels(self.model, self.method, "queue_full").inc()
            raise Overloaded(f"{self.method} queue for model {self.model!r} is full ({self.config.queue_size} "
                             "waiting); retry later", max(self.expected_start_s(), self._batch_s))
        start = self.expected_start_s()
        bound = self.config.max_queue_batches * self._batch_s
        if bound > 0 and start > bound:
            self.metrics.rejected.labels(self.model, self.method, "queue_wait").inc()
            raise Overloaded(f"{self.method} for model {self.model!r} would wait ~{start * 1000:.0f} ms to start, "
                             f"over the server's bound of {self.config.max_queue_batches:g} batch times "
                             f"({bound * 1000:.0f} ms); retry later", start - bound)
        if deadline is None:
            return
        left = deadline - time.monotonic()
        if start >= left:
            self.metrics.rejected.labels(self.model, self.method, "would_miss_deadline").inc()
            raise Overloaded(f"{self.method} for model {self.model!r} could start in ~{start * 1000:.0f} ms, after "
                             f"the call's deadline ({max(0.0, left) * 1000:.0f} ms left); retry later or allow longer",
                             start)

    async def submit(self, key: Any, payload: P, size: int, deadline: float | None = None) -> R:
        """Queue one request and wait for its result. Cancelling the awaiting task withdraws the request."""
        self.check_admission(deadline)
        future = asyncio.get_running_loop().create_future()
        self._items.append(_Item(key, payload, size, deadline, future))
        self._depth.set(len(self._items))
        self._wakeup.set()
        self._outstanding += 1
        try:
            return await future
        finally:
            self._outstanding -= 1
            if not future.done():
                future.cancel()  # the caller went away: the worker skips it

    async def close(self) -> None:
        """Stop the workers; queued requests fail with QueueFull-free cancellation."""
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._items:
            item = self._items.popleft()
            if not item.future.done():
                item.future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _next_batch(self) -> list[_Item]:
        while not self._items:
            self._wakeup.clear()
            await self._wakeup.wait()
        first = self._items.popleft()
        batch, images = [first], first.size
        close_at = first.enqueued + self.config.max_delay_s
        while images < self.config.max_batch:
            if self._items:
                if images + self._items[0].size > self.config.max_batch:
                    break
                item = self._items.popleft()
                batch.append(item)
                images += item.size
                continue
            remaining = close_at - time.monotonic()
            if remaining <= 0 or self._outstanding <= len(batch):
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        self._depth.set(len(self._items))
        return batch

    def _live(self, batch: list[_Item]) -> list[_Item]:
        now = time.monotonic()
        live = []
        for item in batch:
            if item.future.done():  # cancelled by its caller
                self.metrics.rejected.labels(self.model, self.method, "cancelled").inc()
            elif item.deadline is not None and now >= item.deadline:
                self.metrics.rejected.labels(self.model, self.method, "deadline").inc()
                item.future.set_exception(DeadlineExpired(f"deadline passed after {now - item.enqueued:.3f}s "
                                                          f"in the {self.method} queue"))
            else:
                live.append(item)
        return live

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = self._live(await self._next_batch())
            groups: dict[int, list[_Item]] = {}
            for item in batch:
                groups.setdefault(id(item.key), []).append(item)
            for items in groups.values():
                self.metrics.batch_size.labels(self.model, self.method).observe(sum(i.size for i in items))
                started = time.monotonic()
                self._running.append(started)
                try:
                    results = await loop.run_in_executor(
                        self._executor, self.fn, items[0].key, [i.payload for i in items])
                except asyncio.CancelledError:
                    raise
                except Exception as err:  # delivered to every caller; the error table decides the code
                    for item in items:
                        if not item.future.done():
                            item.future.set_exception(err)
                    continue
                finally:
                    self._running.remove(started)
                    took = time.monotonic() - started
                    self._batch_s = took if self._batch_s == 0.0 else self._batch_s + 0.2 * (took - self._batch_s)
                for item, result in zip(items, results, strict=True):
                    if item.future.done():
                        continue
                    if isinstance(result, BaseException):  # one caller's own failure (e.g. its deadline)
                        item.future.set_exception(result)
                    else:
                        item.future.set_result(result)
