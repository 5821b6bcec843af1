"""structlog setup: JSON lines for machines, readable lines in a terminal."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

import orjson
import structlog

__all__ = ["ACCESS_FLUSH_SECONDS", "configure_logging", "get_access_logger", "get_logger"]

# Access lines (one per call) wait at most this long to be written out together, as nginx's
# `access_log ... buffer= flush=` does: one write per batch instead of one per call. Every other
# line is written at once, after the waiting access lines, so order is kept.
ACCESS_FLUSH_SECONDS = 0.1
ACCESS_BUFFER_BYTES = 64 * 1024


class _Output:
    """The bytes stream JSON lines go to, with the access lines' batch."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.pending: list[bytes] = []
        self.size = 0
        self.timer: asyncio.TimerHandle | None = None
        atexit.register(self.flush)

    def now(self, line: bytes) -> None:
        self.pending.append(line + b"\n")
        self.flush()

    def later(self, line: bytes) -> None:
        self.pending.append(line + b"\n")
        self.size += len(line) + 1
        if self.size >= ACCESS_BUFFER_BYTES:
            self.flush()
        elif self.timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop to flush later: write now
                self.flush()
                return
            self.timer = loop.call_later(ACCESS_FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.pending:
            return
        data = b"".join(self.pending)
        self.pending.clear()
        self.size = 0
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stderr
            self.stream.write(data)
            self.stream.flush()


class _JsonLogger:
    """structlog's logger for rendered JSON lines; access loggers batch their info lines."""

    def __init__(self, output: _Output, batched: bool) -> None:
        self._output = output
        self.info = output.later if batched else output.now

    def msg(self, message: bytes) -> None:
        self._output.now(message)

    debug = warning = warn = error = err = critical = exception = fatal = failure = msg


def _json_logger_factory(stream: BinaryIO) -> Callable[..., _JsonLogger]:
    output = _Output(stream)

    def factory(*args: Any) -> _JsonLogger:
        return _JsonLogger(output, batched=args[:1] == ("access",))

    return factory


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    """Route structlog and stdlib logging through one renderer on stderr.

    `json=None` picks JSON unless stderr is a terminal.
    """
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    # structlog's own lines (one per call: the access log) are rendered by orjson straight to
    # bytes; stdlib records keep the str renderer their formatter needs.
    fast: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(serializer=orjson.dumps) if json else renderer
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, fast],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=(
            _json_logger_factory(sys.stderr.buffer)
            if json
            else structlog.PrintLoggerFactory(sys.stderr)
        ),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processor=renderer)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """A structlog logger whose lines carry `component=name`."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=name)
    return logger


def get_access_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """`get_logger` for the access log: its info lines are written in batches (JSON only)."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger("access", component=name)
    return logger
