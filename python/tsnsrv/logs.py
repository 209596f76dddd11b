"""Logging: one logfmt line per event, with syslog priorities when journald reads us."""

from __future__ import annotations

import logging
import os
import re
import sys
import time

# <N> prefixes that journald turns into the message priority (sd-daemon(3)).
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


_NEEDS_QUOTES = re.compile(r'[ "=\n\t]|^$')


def _quote(value: object) -> str:
    text = str(value)
    if _NEEDS_QUOTES.search(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def __init__(self, service: str, journald: bool):
        super().__init__()
        self.service = service
        self.journald = journald
        self._stamp_second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if not self.journald:  # journald stamps lines itself
            second = int(record.created)
            if second != self._stamp_second:  # strftime once a second, not once a line
                self._stamp_second = second
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
            parts.append(f"time={self._stamp}.{int(record.msecs):03d}")
        parts += [f"level={record.levelname.lower()}", f"service={_quote(self.service)}",
                  f"logger={record.name}", f"msg={_quote(record.getMessage())}"]
        for key, value in getattr(record, "fields", ()):
            parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"error={_quote(self.formatException(record.exc_info))}")
        line = " ".join(parts)
        if self.journald:
            return f"<{PRIORITIES.get(record.levelno, 6)}>{line}"
        return line


def setup(service: str, level: str, access_log: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(service, journald=bool(os.environ.get("JOURNAL_STREAM"))))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("tsnsrv.access").disabled = not access_log
