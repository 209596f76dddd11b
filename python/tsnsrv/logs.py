"""Logging: one logfmt line per event, with syslog priorities when journald reads us."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

# <N> prefixes that journald turns into the message priority (sd-daemon(3)).
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
ACCESS_LOGGER = "tsnsrv.access"

_NEEDS_QUOTES = re.compile(r'[ "=\n\t]|^$')


def _quote(value: object) -> str:
    text = str(value)
    if _NEEDS_QUOTES.search(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


Fields = Sequence[tuple[str, Any]]


class LogfmtFormatter(logging.Formatter):
    def __init__(self, service: str, journald: bool):
        super().__init__()
        self.service = service
        self.journald = journald
        self._head = f"service={_quote(service)}"
        self._stamp_second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        error = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(record.created, record.levelno, record.name, record.getMessage(),
                         getattr(record, "fields", ()), error)

    def line(self, created: float, level: int, logger: str, message: str, fields: Fields,
             error: str | None = None) -> str:
        parts = [f"msg={_quote(message)}", *(f"{key}={_quote(value)}" for key, value in fields)]
        if error is not None:
            parts.append(f"error={_quote(error)}")
        return self.prefix(created, level, logger) + " ".join(parts)

    def prefix(self, created: float, level: int, logger: str) -> str:
        """What starts every line: the time (unless journald stamps it), level, service, logger."""
        head = f"level={logging.getLevelName(level).lower()} {self._head} logger={logger} "
        if self.journald:
            return f"<{PRIORITIES.get(level, 6)}>{head}"
        second = int(created)
        if second != self._stamp_second:  # strftime once a second, not once a line
            self._stamp_second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
        return f"time={self._stamp}.{int((created - second) * 1000):03d} {head}"


class AccessLog:
    """The access log: one line per request, like every other log line.

    Written straight to the log stream that `setup` chose: through `logging` (a record,
    the logger hierarchy, handler locks, a flush) a line cost as much as the rest of the
    request's trip through the proxy. Without `setup` (tests), lines go through `logging`."""

    def __init__(self) -> None:
        self._logger = logging.getLogger(ACCESS_LOGGER)
        self._direct = _direct

    @classmethod
    def if_enabled(cls) -> AccessLog | None:
        """The access log, unless it is turned off or the log level is above info."""
        logger = logging.getLogger(ACCESS_LOGGER)
        return cls() if not logger.disabled and logger.isEnabledFor(logging.INFO) else None

    def request(self, method: str, path: str, status: int, bytes_in: int, bytes_out: int, seconds: float,
                client: str, node: str, source: str, remote: str, tags: str, note: str) -> None:
        """One request's line. `method` (an HTTP token), `source` and `remote` (an address)
        never need quoting; the rest is quoted as any value."""
        if self._direct is None:
            fields = [("method", method), ("path", path), ("status", status), ("bytes_in", bytes_in),
                      ("bytes_out", bytes_out), ("duration_ms", f"{seconds * 1000:.1f}"), ("client", client),
                      ("node", node), ("source", source), ("remote", remote)]
            fields += [(key, value) for key, value in (("tags", tags), ("note", note)) if value]
            self._logger.info("request", extra={"fields": fields})
            return
        stream, formatter = self._direct
        line = (f"{formatter.prefix(time.time(), logging.INFO, ACCESS_LOGGER)}msg=request method={method} "
                f"path={_quote(path)} status={status} bytes_in={bytes_in} bytes_out={bytes_out} "
                f"duration_ms={seconds * 1000:.1f} client={_quote(client)} node={_quote(node)} source={source} "
                f"remote={remote}")
        if tags:
            line += f" tags={_quote(tags)}"
        if note:
            line += f" note={_quote(note)}"
        stream.write(line + "\n")


_direct: tuple[TextIO, LogfmtFormatter] | None = None


def setup(service: str, level: str, access_log: bool) -> None:
    global _direct
    formatter = LogfmtFormatter(service, journald=bool(os.environ.get("JOURNAL_STREAM")))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger(ACCESS_LOGGER).disabled = not access_log
    _direct = (sys.stderr, formatter)
