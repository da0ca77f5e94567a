"""Decode threads shared fairly by calls, so one heavy request cannot starve the others (docs/design.md §9.1,
"Decoding with budgets").

A plain executor runs a request's decoding as one job in arrival order: a request of many large PNGs then holds
the threads for tens of seconds, past its own deadline, while small requests queue behind it. Here each call's
work is split into steps (one to check every header and the request's pixel budget, then one per encoded image),
and the threads take steps round-robin across calls, at most `per_call` of one call's steps at a time. Steps
that decode a large image (over LIGHT_PIXELS) may hold at most `threads - 1` threads, so one thread is always
free for small images and headers: a normal request waits behind other small work, never behind a 4096x4096
PNG. A call whose deadline passes or that is cancelled (the client went away, the server is stopping) has its
remaining steps dropped: the work stops within one image.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from conceptlens.handlers.errors import ModelLoading
from conceptlens_client.v1 import conceptlens_service_pb2 as pb

from .decoding import ImageSpec, plan_images
from .errors import DeadlineExpired

LIGHT_PIXELS = 1024 * 1024  # images up to this area decode in ~10-20 ms on one core; larger ones are "heavy"


class _Call:
    """One request's decode work: steps still to run, how many run now, and how it ends."""

    def __init__(self, deadline: float | None, finish: Callable[[BaseException | None], None],
                 closing: threading.Event) -> None:
        self.closing = closing
        self.steps: deque[tuple[Callable[[], None], bool]] = deque()  # (step, heavy)
        self.deadline = deadline
        self.finish = finish
        self.running = 0
        self.queued = False
        self.error: BaseException | None = None
        self.cancelled = False

    def stopped(self) -> bool:
        if self.error is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.error = DeadlineExpired("the deadline passed while the request's images were being decoded")
        if self.error is None and self.closing.is_set():
            self.error = ModelLoading("the server is stopping; retry on another replica")
        return self.cancelled or self.error is not None


class DecodePool:
    """`threads` decode threads; each call gets at most `per_call` of them at once. `await decode(...)`."""

    def __init__(self, threads: int = 2, per_call: int = 1) -> None:
        self.per_call = max(1, per_call)
        self.heavy_threads = max(1, threads - 1)
        self._heavy_running = 0
        self._running = 0  # steps being run now
        self._ready: deque[_Call] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self._closing = threading.Event()
        self._threads = [threading.Thread(target=self._work, name=f"decode-{i}", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    async def decode(self, images: Sequence[pb.Image], spec: ImageSpec, *, max_pixels: int,
                     max_request_pixels: int | None, deadline: float | None) -> np.ndarray:
        """The request's images as one (N, C, size, size) float32 array in [0, 1]. Raises InvalidInput from the
        checks, DeadlineExpired when `deadline` (time.monotonic) passes first; cancelling the awaiting task
        drops the call's remaining work."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        result: dict[str, np.ndarray] = {}

        def finish(error: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
                loop.call_soon_threadsafe(_settle, future, error, result.get("out"))

        call = _Call(deadline, finish, self._closing)

        def plan() -> None:
            planned = plan_images(images, spec, max_pixels=max_pixels, max_request_pixels=max_request_pixels)
            result["out"] = planned.out
            with self._lock:
                call.steps.extend((lambda i=i, img=img: planned.decode(i, img, spec),
                                   img.size[0] * img.size[1] > LIGHT_PIXELS) for i, img in planned.pending)

        call.steps.append((plan, False))
        with self._lock:
            if self._closed:
                raise RuntimeError("the decode pool is closed")
            self._enqueue(call)
        try:
            return await future
        except asyncio.CancelledError:
            with self._lock:
                call.cancelled = True
                call.steps.clear()
            raise

    def pending(self) -> int:
        """Images (and header checks) queued or being decoded now, over all calls."""
        with self._lock:
            return sum(len(call.steps) for call in self._ready) + self._running

    def close(self) -> None:
        """Stop the threads after the steps they are running; calls still waiting fail UNAVAILABLE."""
        with self._lock:
            self._closed = True
            self._closing.set()
            waiting = [call for call in self._ready if call.running == 0]
            for call in self._ready:
                call.stopped()  # records the error
                call.steps.clear()
            self._ready.clear()
            self._lock.notify_all()
        for call in waiting:  # the others are finished by their thread when its step ends
            if not call.cancelled:
                call.finish(call.error)

    # --- the threads ----------------------------------------------------------------------------------------

    def _enqueue(self, call: _Call) -> None:
        """Put `call` at the back of the round-robin if it has steps it may start now (lock held)."""
        if call.steps and not call.queued and call.running < self.per_call:
            call.queued = True
            self._ready.append(call)
            self._lock.notify()

    def _next(self) -> _Call | None:
        """The first call in round-robin order whose next step may start now (lock held): a heavy step only
        while fewer than `heavy_threads` heavy steps run; a stopped call is taken to be wound up."""
        for position, call in enumerate(self._ready):
            if call.stopped() or not call.steps[0][1] or self._heavy_running < self.heavy_threads:
                del self._ready[position]
                return call
        return None

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._closed and (call := self._next()) is None:
                    self._lock.wait()
                if self._closed:
                    return
                call.queued = False
                step, heavy = call.steps.popleft() if call.steps and not call.stopped() else (None, False)
                call.running += 1
                self._running += step is not None
                self._heavy_running += heavy
                self._enqueue(call)  # more of its steps may run beside this one, up to per_call
            if step is not None:
                try:
                    step()
                except BaseException as err:  # handed to the awaiting call, which raises it
                    with self._lock:
                        call.error = call.error or err
            with self._lock:
                call.running -= 1
                self._running -= step is not None
                self._heavy_running -= heavy
                if heavy:
                    self._lock.notify_all()  # a waiting thread may take a heavy step now
                if call.stopped():
                    call.steps.clear()
                self._enqueue(call)
                done = not call.steps and call.running == 0 and not call.queued
            if done and not call.cancelled:
                call.finish(call.error)


def _settle(future: asyncio.Future, error: BaseException | None, out: np.ndarray | None) -> None:
    if future.done():  # cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(out)
