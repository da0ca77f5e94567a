"""Prometheus metrics of the shedding front: the calls nginx refused, counted from its refusals.log (docs/design.md
§9.2).

nginx has no per-location counters (its stub_status counts connections), so the front logs one line per refusal
(`$msec $uri`) and `RefusalLog` counts the lines it has not read yet whenever it is asked, i.e. at every scrape.
The log cannot grow without bound under a long overload: past `rotate_bytes` it is rotated the way logrotate does
it, renamed to refusals.log.1 and nginx told to reopen its logs (`reopen`, SIGUSR1); lines nginx still appends to
the renamed file before it reopens are counted at the next read. Counts live in the front's process, so a restart
starts them at 0, which Prometheus treats as the counter reset it is.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LOG_NAME = "refusals.log"
ROTATED_NAME = "refusals.log.1"
ROTATE_BYTES = 8 << 20  # ~300,000 refusals per file (one line is ~27 bytes)


class RefusalLog:
    """Refusal counts per method, read incrementally from the front's directory."""

    def __init__(self, directory: Path, reopen: Callable[[], None] | None = None,
                 rotate_bytes: int = ROTATE_BYTES) -> None:
        self.path = Path(directory) / LOG_NAME
        self.rotated = Path(directory) / ROTATED_NAME
        self._reopen = reopen  # None: never rotate (a reader that does not own the nginx process)
        self._rotate_bytes = rotate_bytes
        self._offset = 0  # bytes of refusals.log counted
        self._rotated_offset: int | None = None  # bytes of refusals.log.1 counted, while it may still grow
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()  # scrapes arrive on prometheus_client's server threads

    def counts(self) -> dict[str, int]:
        """Calls refused so far, by method name."""
        with self._lock:
            if self._rotated_offset is not None and self.rotated.is_file():
                self._rotated_offset = self._count_from(self.rotated, self._rotated_offset)
            if self.path.is_file():
                self._offset = self._count_from(self.path, self._offset)
                if self._reopen is not None and self._offset >= self._rotate_bytes:
                    self._rotate()
            return dict(self._counts)

    def _count_from(self, path: Path, offset: int) -> int:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
        complete = data.rfind(b"\n") + 1  # a line nginx is still writing is counted at the next read
        for line in data[:complete].splitlines():
            self._counts[line.rsplit(b"/", 1)[-1].decode("ascii", "replace")] += 1
        return offset + complete

    def _rotate(self) -> None:
        os.replace(self.path, self.rotated)  # the previous rotation's stragglers were counted above
        self._rotated_offset, self._offset = self._offset, 0
        self._reopen()


class FrontCollector(Collector):
    """`conceptlens_front_refusals_total{method}` and `conceptlens_front_limit{method}`."""

    def __init__(self, log: RefusalLog, limits: Mapping[str, int]) -> None:
        self._log, self._limits = log, dict(limits)

    def collect(self) -> Iterator[Metric]:
        counts = self._log.counts()
        refused = CounterMetricFamily("conceptlens_front_refusals", "Calls the front refused with "
                                      "RESOURCE_EXHAUSTED over their method's in-flight limit (the server never "
                                      "sees them)", labels=("method",))
        limit = GaugeMetricFamily("conceptlens_front_limit", "The front's limit of calls in flight per method",
                                  labels=("method",))
        for method in sorted(set(self._limits) | set(counts)):
            refused.add_metric((method,), counts.get(method, 0))
        for method, n in sorted(self._limits.items()):
            limit.add_metric((method,), n)
        yield refused
        yield limit
