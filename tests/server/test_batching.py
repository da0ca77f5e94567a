"""The dynamic batcher on its own: batches form up to max_batch, a full queue refuses at once, expired
deadlines are dropped unrun, cancelled callers are skipped, and the work runs off the event loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from conceptlens.handlers.errors import QueueFull
from conceptlens.server.batching import Batcher
from conceptlens.server.config import BatchConfig
from conceptlens.server.errors import DeadlineExpired
from conceptlens.server.metrics import Metrics


class Recorder:
    """A batch function that records the batches it ran (and on which thread), optionally slowly."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay, self.gate = delay, gate

    def __call__(self, key, payloads):
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay)
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(payloads))
        return [p * 10 for p in payloads]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_batches_up_to_max_batch():
    fn = Recorder()

    async def main():
        b = Batcher("m", "predict", fn, BatchConfig(max_batch=4, max_delay_s=0.05, queue_size=64), Metrics())
        results = await asyncio.gather(*(b.submit("k", i, 1) for i in range(10)))
        await b.close()
        return results

    assert run(main()) == [i * 10 for i in range(10)]
    assert all(len(batch) <= 4 for batch in fn.batches) and len(fn.batches) <= 4
    assert sorted(x for batch in fn.batches for x in batch) == list(range(10))
    assert threading.main_thread().name not in fn.threads  # model work never runs on the event loop's thread


def test_versions_never_mix_in_one_call():
    fn = Recorder()

    async def main():
        b = Batcher("m", "predict", fn, BatchConfig(max_batch=8, max_delay_s=0.05), Metrics())
        k1, k2 = object(), object()
        await asyncio.gather(*(b.submit(k1 if i % 2 else k2, i, 1) for i in range(6)))
        await b.close()

    run(main())
    assert sorted(sorted(batch) for batch in fn.batches) == [[0, 2, 4], [1, 3, 5]]


def test_full_queue_refuses_at_once():
    gate = threading.Event()
    fn = Recorder(gate=gate)
    metrics = Metrics()

    async def main():
        b = Batcher("m", "probe", fn, BatchConfig(max_batch=1, max_delay_s=0, queue_size=2), metrics)
        first = asyncio.create_task(b.submit("k", 0, 1))
        await asyncio.sleep(0.05)  # the worker holds item 0 (blocked on the gate); the queue is empty
        queued = [asyncio.create_task(b.submit("k", i, 1)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="probe queue for model 'm' is full"):
            await b.submit("k", 3, 1)
        gate.set()
        done = await asyncio.gather(first, *queued)
        await b.close()
        return done

    assert run(main()) == [0, 10, 20]
    assert metrics.rejected.labels("m", "probe", "queue_full")._value.get() == 1


def test_expired_deadline_is_dropped_and_cancelled_caller_skipped():
    gate = threading.Event()
    fn = Recorder(gate=gate)

    async def main():
        b = Batcher("m", "explain", fn, BatchConfig(max_batch=1, max_delay_s=0, queue_size=8), Metrics())
        blocker = asyncio.create_task(b.submit("k", 0, 1))
        await asyncio.sleep(0.05)
        expiring = asyncio.create_task(b.submit("k", 1, 1, deadline=time.monotonic() + 0.01))
        cancelled = asyncio.create_task(b.submit("k", 2, 1))
        alive = asyncio.create_task(b.submit("k", 3, 1))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        gate.set()
        assert await blocker == 0
        with pytest.raises(DeadlineExpired):
            await expiring
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert await alive == 30
        await b.close()

    run(main())
    assert [batch for batch in fn.batches] == [[0], [3]]


def test_errors_reach_every_caller_of_the_batch():
    def boom(key, payloads):
        raise RuntimeError("backend failed")

    async def main():
        b = Batcher("m", "predict", boom, BatchConfig(max_batch=4, max_delay_s=0.02), Metrics())
        results = await asyncio.gather(*(b.submit("k", i, 1) for i in range(3)), return_exceptions=True)
        await b.close()
        return results

    assert all(isinstance(r, RuntimeError) for r in run(main()))


def test_lone_caller_does_not_wait_for_the_delay_but_a_crowd_does_batch():
    fn = Recorder()

    async def main():
        b = Batcher("m", "predict", fn, BatchConfig(max_batch=8, max_delay_s=2.0), Metrics())
        start = time.monotonic()
        assert await b.submit("k", 1, 1) == 10
        lone = time.monotonic() - start
        results = await asyncio.gather(*(b.submit("k", i, 1) for i in range(8)))
        await b.close()
        return lone, results

    lone, results = run(main())
    assert lone < 1.0 and results == [i * 10 for i in range(8)]
    assert len(fn.batches) <= 3  # the eight concurrent callers shared batches
