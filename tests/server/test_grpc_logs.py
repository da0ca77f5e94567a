"""gRPC's per-call ERROR for replies raced by the client's deadline becomes one WARNING per interval, with a count
and no traceback; other gRPC log lines pass untouched."""

from __future__ import annotations

import logging

from conceptlens.server import grpc_logs


def _raced(logger: logging.Logger) -> None:
    try:
        raise RuntimeError("batch failed")
    except RuntimeError:
        logger.exception("ExecuteBatchError raised in core by servicer method [%s]", "/conceptlens.v1.Service/Predict")


def test_raced_replies_are_counted_into_one_warning_per_interval(caplog):
    logger = logging.getLogger("test_grpc_logs.core")
    log_filter = grpc_logs.RacedReplyFilter(every_s=60)
    logger.addFilter(log_filter)
    try:
        with caplog.at_level(logging.DEBUG, logger=logger.name):
            for _ in range(5):
                _raced(logger)
            logger.error("some other core error")
            log_filter._last -= 61  # the interval has passed
            _raced(logger)
    finally:
        logger.removeFilter(log_filter)
    records = [(r.levelname, r.getMessage(), r.exc_info) for r in caplog.records]
    assert records[0][0] == "WARNING" and records[0][1].startswith("1 reply could not be sent in the last 60 s")
    assert records[0][2] is None  # no traceback
    assert records[1] == ("ERROR", "some other core error", None)
    assert records[2][0] == "WARNING" and records[2][1].startswith("5 replies could not be sent")
    assert len(records) == 3


def test_install_attaches_one_filter_to_grpcs_core_logger():
    first, second = grpc_logs.install(), grpc_logs.install()
    assert first is second
    assert logging.getLogger(grpc_logs.CORE_LOGGER).filters.count(first) == 1
