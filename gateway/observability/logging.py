"""structlog setup: JSON lines for machines, readable lines in a terminal."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog

__all__ = ["configure_logging", "get_logger"]


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
            structlog.BytesLoggerFactory(sys.stderr.buffer)
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
