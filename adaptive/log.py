"""structlog configuration, done once per process.

Human-readable on a terminal, JSON lines otherwise. Context such as ``case_id``,
``fraction`` or ``session_id`` is bound with :func:`bind` and appears on every line.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


class _StderrLogger(structlog.PrintLogger):
    """Writes to whatever ``sys.stderr`` is *now* (not the stream at configuration time), so
    a redirected/replaced stderr (test capture, daemonised service) never breaks logging."""

    def msg(self, message: str) -> None:
        stream = sys.stderr
        try:
            stream.write(message + "\n")
            stream.flush()
        except (ValueError, OSError):  # closed stream: logging must never crash the caller
            pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _StderrLoggerFactory:
    def __call__(self, *args) -> _StderrLogger:
        return _StderrLogger(sys.stderr)


def configure_logging(json: bool | None = None, level: str | None = None, **context) -> None:
    """Configure structlog (idempotent). ``json=None`` picks JSON unless stderr is a TTY."""
    global _configured
    level = (level or os.environ.get("ADAPTIVE_LOG_LEVEL", "INFO")).upper()
    if json is None:
        env = os.environ.get("ADAPTIVE_LOG_JSON")
        json = (env == "1") if env is not None else not sys.stderr.isatty()
    renderer = (structlog.processors.JSONRenderer() if json
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level, logging.INFO)),
        logger_factory=_StderrLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    # Third-party loggers (pynetdicom at INFO costs ~50% receive time) stay at WARNING.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    for name in ("pynetdicom", "numba", "itk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if context:
        bind(**context)
    _configured = True


def bind(**context) -> None:
    """Bind context (case_id, fraction, session_id, ...) to every later log line."""
    structlog.contextvars.bind_contextvars(**{k: v for k, v in context.items() if v is not None})


def get_logger(name: str | None = None):
    if not _configured:
        configure_logging()
    return structlog.get_logger(name) if name else structlog.get_logger()
