"""Logging that keeps the structured fields: JSON lines or readable text, plus the fields of
the request being served.

The code logs with ``extra=`` fields (``log.warning("slot write failed", extra={"adapter":
key, "slot": slot})``). :func:`configure_logging` installs one handler on the root logger
whose formatter writes every one of them:

- JSON (:class:`pythonjsonlogger.json.JsonFormatter`), one object a line: ``timestamp``
  (ISO 8601, UTC), ``level``, ``logger``, ``message``, each ``extra=`` field, and
  ``exc_info`` (the formatted traceback) when there is one;
- text, for a person at a terminal: ``time LEVEL logger: message key=value ...`` and the
  traceback below.

uvicorn's loggers (``uvicorn``, ``uvicorn.error``, ``uvicorn.access``) lose their own
handlers and propagate to the same one (start uvicorn with ``log_config=None``, as
:class:`tessera.server.runner.TesseraServer` does); an access line also gets ``client``,
``http_method``, ``path``, ``http_version`` and ``status_code`` fields.

Request context: :func:`bind_request` adds fields (``request_id``, ``tenant``, ``model``,
``adapter``, ``method``) to a :class:`~contextvars.ContextVar`, and the handler's
:class:`RequestContextFilter` copies them onto every record logged in that context, never
over a field the call passed itself. The inference routes bind them; every line logged
while serving the request — the route, the service, the exception handlers, uvicorn's
access line — carries them. The context follows the request's task and the tasks and
``asyncio.to_thread`` calls it starts; it does not reach the engine's forward thread
(``run_in_executor``), whose lines name ``request_id`` / ``adapter`` explicitly.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import IO, Any, Final

from pythonjsonlogger.json import JsonFormatter

LOG_FORMATS: Final = ("auto", "json", "text")
UVICORN_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access")

# the attributes every LogRecord has (and what formatters add): the rest came from extra=
_STANDARD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName",
    "color_message",  # uvicorn's copy of its message with terminal colours
}

_context: ContextVar[Mapping[str, Any]] = ContextVar("tessera_log_context",
                                                    default=MappingProxyType({}))


def bind_request(**fields: Any) -> None:
    """Add ``fields`` (None values skipped) to the log context of the current task.

    Not undone on return, on purpose: the exception handlers and uvicorn's access line run
    in the request's task after the route returned, and they should carry the fields too.
    uvicorn serves each request in a task of its own, so the fields end with the request.
    """
    _context.set(MappingProxyType(
        {**_context.get(), **{k: v for k, v in fields.items() if v is not None}}))


class RequestContextFilter(logging.Filter):
    """Copies the bound request fields onto each record; a field the call passed in
    ``extra=`` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if key not in record.__dict__:
                setattr(record, key, value)
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) \
                and len(record.args) == 5 and "status_code" not in record.__dict__:
            # uvicorn: '%s - "%s %s HTTP/%s" %d' % (client, method, path, version, status)
            for key, value in zip(("client", "http_method", "path", "http_version",
                                   "status_code"), record.args, strict=True):
                setattr(record, key, value)
        return True


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields of ``record`` that came from ``extra=`` (or the request context)."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def _text_value(value: Any) -> str:
    if isinstance(value, str):
        bare = value and not any(c.isspace() or c in "\"'=" for c in value)
        return value if bare else json.dumps(value)
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return json.dumps(str(value))


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``, then the traceback if any."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = " ".join(f"{k}={_text_value(v)}" for k, v in extra_fields(record).items())
        return f"{line} {fields}" if fields else line


def json_formatter() -> JsonFormatter:
    return JsonFormatter(
        "%(levelname)s %(name)s %(message)s", timestamp=True,
        rename_fields={"levelname": "level", "name": "logger"},
        reserved_attrs=sorted(_STANDARD), json_ensure_ascii=False)


def make_handler(*, json_format: bool | None = None,
                 stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (stderr by default) with the formatter and the context filter.
    ``json_format`` None: JSON unless the stream is a terminal."""
    stream = stream if stream is not None else sys.stderr
    if json_format is None:
        json_format = not (hasattr(stream, "isatty") and stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter() if json_format else TextFormatter())
    handler.addFilter(RequestContextFilter())
    return handler


def json_format_of(name: str) -> bool | None:
    """``--log-format`` / ``TESSERA_LOG_FORMAT``: ``auto`` (None), ``json`` or ``text``."""
    value = name.strip().lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {name!r}")
    return None if value == "auto" else value == "json"


def configure_logging(level: str, *, json_format: bool | None = None,
                      stream: IO[str] | None = None) -> logging.Handler:
    """The process's logging: one handler on the root logger (replacing any), ``level``
    (``info``, ``DEBUG``...), uvicorn's loggers sent through it. Returns the handler."""
    handler = make_handler(json_format=json_format, stream=stream)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return handler
