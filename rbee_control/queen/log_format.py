"""`queen-rbee --log-format json`: one JSON object per log line, for log shippers.

Fields: `ts` (ISO 8601, UTC), `level`, `logger`, `msg`; an access line's
`key=value` pairs are also given as fields of their own.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

_PAIR_RE = re.compile(r"(\w+)=(\S+)")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": msg,
        }
        if record.name == "rbee.access":
            line.update({k: v for k, v in _PAIR_RE.findall(msg) if k not in line})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    """The queen's logging on stderr, as text (default) or JSON lines."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
