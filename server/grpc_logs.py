"""gRPC's own log lines about calls that ended under the server, rate-limited.

When a client's deadline or cancel races the server's reply, grpc.aio fails the reply's send batch and logs
"ExecuteBatchError raised in core by servicer method [...]" at ERROR with a traceback, once per call. Under
overload that is hundreds of ERROR tracebacks a second for an outcome the client already has (DEADLINE_EXCEEDED
or CANCELLED, counted in `conceptlens_requests_total`). The filter keeps one WARNING per `every_s` seconds that
says how many there were, and no traceback.
"""

from __future__ import annotations

import logging
import threading
import time

CORE_LOGGER = "grpc._cython.cygrpc"
RACED_REPLY = "ExecuteBatchError raised in core by servicer method"


class RacedReplyFilter(logging.Filter):
    def __init__(self, every_s: float = 10.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last = -float("inf")
        self._count = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(RACED_REPLY):
            return True
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._last < self.every_s:
                return False
            count, self._count, self._last = self._count, 0, now
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = ("%d repl%s could not be sent in the last %.0f s: the call had already ended (client deadline "
                      "or cancel; counted in conceptlens_requests_total)")
        record.args = (count, "y" if count == 1 else "ies", self.every_s)
        record.exc_info = record.exc_text = None
        return True


def install(every_s: float = 10.0) -> RacedReplyFilter:
    """Attach the filter to gRPC's core logger once per process; returns the one attached."""
    logger = logging.getLogger(CORE_LOGGER)
    for existing in logger.filters:
        if isinstance(existing, RacedReplyFilter):
            return existing
    log_filter = RacedReplyFilter(every_s)
    logger.addFilter(log_filter)
    return log_filter
