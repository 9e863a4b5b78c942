"""The JSON-lines contract between `rbee-hive` (producer) and the keeper (consumer)."""

from __future__ import annotations

import io

import pytest

from rbee_worker.protocol.errors import ErrorCode, RbeeError
from rbee_worker.protocol.node_events import Emitter, parse_line


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_events_round_trip_and_progress_is_rate_limited() -> None:
    out, clock = io.StringIO(), Clock()
    emitter = Emitter(json_mode=True, out=out, clock=clock)
    for i in range(1000):  # 1000 chunks in one simulated second
        clock.now = i / 1000
        emitter.progress("download", i * 10, 10_000, 5e6)
    emitter.progress("download", 10_000, 10_000, 5e6, force=True)
    emitter.log("resuming")
    emitter.result({"name": "tiny", "cached": False})
    events = [parse_line(line) for line in out.getvalue().splitlines()]
    progress = [e for e in events if e.event == "progress"]
    assert 9 <= len(progress) <= 12, len(progress)
    assert progress[-1].data == {"phase": "download", "bytes": 10_000, "total": 10_000, "speed": 5e6}
    assert [e.event for e in events[-2:]] == ["log", "result"]
    assert events[-1].is_final and events[-1].data == {"name": "tiny", "cached": False}


def test_error_event_carries_code_details_and_hint() -> None:
    out = io.StringIO()
    err = RbeeError(ErrorCode.DISK_FULL, "full", details={"free_bytes": 3}, hint="rbee-hive models rm X")
    Emitter(json_mode=True, out=out).error(err)
    event = parse_line(out.getvalue())
    assert event.event == "error" and event.is_final
    back = event.to_error()
    assert (back.code, back.message, back.details, back.hint) == (
        "DISK_FULL",
        "full",
        {"free_bytes": 3},
        err.hint,
    )


def test_human_mode_writes_prose_not_json() -> None:
    out, err = io.StringIO(), io.StringIO()
    emitter = Emitter(json_mode=False, out=out, err=err)
    emitter.progress("download", 500_000, 1_000_000, 2e6)
    emitter.result({"x": 1}, "tiny: added")
    emitter.error(RbeeError(ErrorCode.HIVE_NOT_RUNNING, "not running", hint="rbee-hive daemon --detach"))
    assert out.getvalue() == "tiny: added\n"
    assert "download: 500.0 KB / 1.0 MB (50%)" in err.getvalue()
    assert "hint: rbee-hive daemon --detach" in err.getvalue()


@pytest.mark.parametrize("line", ["", "not json", "[1]", '{"event": "nope"}', '{"code": 1}'])
def test_parse_line_refuses_what_is_not_an_event(line: str) -> None:
    with pytest.raises(ValueError):
        parse_line(line)
