"""Log lines: plain text (default) or one JSON object per line, each with the request's id.

Plain-text lines cannot be forged by a client: every control character in a message (CR, LF,
NUL, ESC, ...), wherever it came from (a URL path, a header, a field name), is written as an
escape (``\\n``, ``\\x1b``), and the lines of a traceback are indented under their record, so
that nothing a client sends can start a line of its own. JSON lines are escaped by JSON.
"""
from __future__ import annotations

import json
import logging
import re
import time

from rerank_server.service import request_id_var

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# C0 and C1 controls, DEL, and the line and paragraph separators some viewers break lines at
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` with every control character escaped as Python would write it ("\\n", "\\x00")."""
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], text)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class PlainFormatter(logging.Formatter):
    def __init__(self):
        super().__init__(PLAIN_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, exc_info) -> str:  # noqa: N802
        return "\n".join("    " + escape_controls(line) for line in super().formatException(exc_info).splitlines())

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return "\n".join("    " + escape_controls(line) for line in stack_info.splitlines())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "request_id": record.request_id, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class RateLimitedLog:
    """At most one line per ``interval`` seconds; the lines left out are counted in the next."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0):
        self.logger, self.interval = logger, interval
        self.last, self.suppressed = float("-inf"), 0

    def warning(self, message: str, *args) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        if self.suppressed:
            message += f" ({self.suppressed} more such lines left out)"
        self.last, self.suppressed = now, 0
        self.logger.warning(message, *args)


class AcceptErrorFilter(logging.Filter):
    """asyncio's report of an accept() that failed for want of file descriptors (a flood of
    connections; asyncio pauses accepting for a second and goes on): one WARNING line at most
    every 10 s instead of an ERROR with a traceback per failed accept."""

    def __init__(self, interval: float = 10.0):
        super().__init__()
        self.interval, self.last, self.left_out = interval, float("-inf"), 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("socket.accept() out of system resource"):
            return True
        now = time.monotonic()
        if now - self.last < self.interval:
            self.left_out += 1
            return False
        error = record.exc_info[1] if record.exc_info else None
        record.msg, record.args = "accepting connections paused for 1 s: %s (%d more such failures left out)", (
            getattr(error, "strerror", None) or "out of file descriptors", self.left_out)
        record.levelno, record.levelname, record.exc_info, record.exc_text = logging.WARNING, "WARNING", None, None
        self.last, self.left_out = now, 0
        return True


def setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if as_json else PlainFormatter())
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("asyncio").addFilter(AcceptErrorFilter())
