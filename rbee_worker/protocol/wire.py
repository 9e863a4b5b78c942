"""Field checks shared by the wire models' parsers: one wording for every bad field.

Parsers take `dict[str, Any]` (what `json.loads` gives) and nothing above them
does; a bad field is a 400 `INVALID_REQUEST` naming it in `details.field`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import ErrorCode, RbeeError


def invalid(field_name: str, message: str) -> RbeeError:
    return RbeeError(ErrorCode.INVALID_REQUEST, f"{field_name}: {message}", details={"field": field_name})


def require_object(body: Any, what: str = "body") -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid(what, "expected a JSON object")
    return body


def reject_unknown(body: dict[str, Any], known: Iterable[str]) -> None:
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise invalid(unknown[0], "unknown field")


def opt_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise invalid(name, "expected a non-empty string")
    return value


def req_str(body: dict[str, Any], name: str) -> str:
    value = opt_str(body, name)
    if value is None:
        raise invalid(name, "required")
    return value


def opt_int(body: dict[str, Any], name: str, minimum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, "expected an integer")
    if minimum is not None and value < minimum:
        raise invalid(name, f"expected >= {minimum}, got {value}")
    return value


def opt_float(body: dict[str, Any], name: str, minimum: float | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(name, "expected a number")
    if minimum is not None and value < minimum:
        raise invalid(name, f"expected >= {minimum:g}, got {value}")
    return float(value)


def opt_bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, "expected true or false")
    return value
