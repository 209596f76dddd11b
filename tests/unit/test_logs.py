"""Log lines (tsnsrv.logs): logfmt with escaping, and journald <N> priority prefixes."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tsnsrv import logs
from tsnsrv.logs import LogfmtFormatter, _quote


def record(msg: str = "hello", level: int = logging.INFO, fields=(), exc_info=None, name: str = "tsnsrv.x"):
    rec = logging.LogRecord(name, level, __file__, 1, msg, (), exc_info)
    if fields:
        rec.fields = list(fields)
    return rec


def unquote(value: str) -> str:
    """What a logfmt reader makes of one value."""
    if not value.startswith('"'):
        return value
    assert value.endswith('"') and len(value) >= 2
    return re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value[1:-1])


@pytest.mark.parametrize(("value", "written"), [
    ("plain", "plain"),
    ("", '""'),
    ("two words", '"two words"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("a=b", '"a=b"'),
    ("line1\nline2", '"line1\\nline2"'),
    ("tab\there", '"tab\there"'),
    ("back\\slash in quotes ", '"back\\\\slash in quotes "'),
    (42, "42"),
])
def test_quote_examples(value, written):
    assert _quote(value) == written


@given(st.text())
def test_quoted_values_read_back_and_stay_on_one_line(text):
    written = _quote(text)
    assert "\n" not in written
    assert " " not in written or written.startswith('"')
    assert unquote(written) == text


def test_terminal_line_has_time_level_service_logger_msg_and_fields():
    line = LogfmtFormatter("books", journald=False).format(
        record("request", fields=[("status", 200), ("path", "/a b")]))
    assert re.fullmatch(r'time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} level=info service=books logger=tsnsrv\.x '
                        r'msg=request status=200 path="/a b"', line), line


@pytest.mark.parametrize(("level", "prefix"), [
    (logging.DEBUG, "<7>"), (logging.INFO, "<6>"), (logging.WARNING, "<4>"), (logging.ERROR, "<3>"),
    (logging.CRITICAL, "<2>"), (25, "<6>"),
])
def test_journald_lines_carry_priority_and_no_time(level, prefix):
    line = LogfmtFormatter("books", journald=True).format(record("x", level=level))
    assert line.startswith(prefix + "level=")
    assert "time=" not in line


def test_exceptions_become_one_escaped_field():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        exc_info = sys.exc_info()
    line = LogfmtFormatter("books", journald=True).format(record("failed", level=logging.ERROR, exc_info=exc_info))
    assert "\n" not in line
    error = line.split(" error=", 1)[1]
    assert unquote(error).startswith("Traceback (most recent call last):\n")
    assert unquote(error).endswith("RuntimeError: boom")


@given(msg=st.text(), value=st.text())
def test_no_message_or_field_can_break_the_line(msg, value):
    line = LogfmtFormatter("svc name", journald=True).format(record(msg, fields=[("k", value)]))
    assert "\n" not in line
    assert line.startswith('<6>level=info service="svc name" ')


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access = logging.getLogger("tsnsrv.access").disabled
    server = logging.getLogger("aiohttp.server").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("tsnsrv.access").disabled = access
    logging.getLogger("aiohttp.server").setLevel(server)


@pytest.mark.parametrize(("journal", "journald"), [("8:1234", True), ("", False)])
def test_setup_picks_journald_format_from_journal_stream(monkeypatch, restore_logging, journal, journald):
    monkeypatch.setenv("JOURNAL_STREAM", journal)
    logs.setup("books", "warning", access_log=False)
    root = logging.getLogger()
    [handler] = root.handlers
    assert isinstance(handler.formatter, LogfmtFormatter)
    assert handler.formatter.journald is journald and handler.formatter.service == "books"
    assert root.level == logging.WARNING
    assert logging.getLogger("tsnsrv.access").disabled is True


def test_setup_keeps_access_log_when_asked(monkeypatch, restore_logging):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    logs.setup("books", "debug", access_log=True)
    assert logging.getLogger("tsnsrv.access").disabled is False
    assert logging.getLogger().level == logging.DEBUG


def test_access_lines_written_directly_read_like_every_other_line(monkeypatch, restore_logging):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    logs.setup("books", "info", access_log=True)
    access = logs.AccessLog.if_enabled()
    assert access is not None
    access.request("GET", '/a b?q="x"', 200, 0, 1024, 0.0123, "alice@example.com", "", "tailnet", "100.64.0.9",
                   "tag:ci,tag:x", "")
    line = stream.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    assert re.fullmatch(r'time=\S+ level=info service=books logger=tsnsrv\.access msg=request method=GET '
                        r'path="/a b\?q=\\"x\\"" status=200 bytes_in=0 bytes_out=1024 duration_ms=12\.3 '
                        r'client=alice@example\.com node="" source=tailnet remote=100\.64\.0\.9 tags=tag:ci,tag:x\n',
                        line), line


def test_no_access_log_below_info_or_when_turned_off(monkeypatch, restore_logging):
    logs.setup("books", "warning", access_log=True)
    assert logs.AccessLog.if_enabled() is None
    logs.setup("books", "info", access_log=False)
    assert logs.AccessLog.if_enabled() is None
