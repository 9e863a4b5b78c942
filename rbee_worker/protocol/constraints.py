"""The inference fields beyond plain sampling: penalties, logit bias, log-probabilities, grammars, tools.

Parsed once here, so the worker, the queen and the keeper agree on names, ranges
and shapes; a bad value is a 400 `INVALID_REQUEST` naming the field. A JSON
schema is checked for shape here (an object whose keywords have the right JSON
types); turning it into a grammar is the worker's, which refuses what its
converter cannot express.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .wire import invalid

MAX_GRAMMAR_CHARS = 64 * 1024
MAX_SCHEMA_CHARS = 64 * 1024
MAX_LOGIT_BIAS = 1024
MAX_TOP_LOGPROBS = 20
MAX_TOOLS = 128
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

#: JSON-schema keywords whose value must be a schema, a list of schemas or a map of them.
_SCHEMA_KEYS = ("items", "not", "additionalProperties", "contains", "propertyNames", "if", "then", "else")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


@dataclass(slots=True)
class Constraints:
    """What a request adds to top-k/top-p/temperature sampling; the defaults change nothing."""

    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: Tokens the penalties look back over; -1: the whole context.
    penalty_last_n: int = 64
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    #: GBNF text (root rule `root`) the output must match.
    grammar: str | None = None
    #: A JSON schema the output must match; the worker turns it into a grammar.
    json_schema: dict[str, Any] | None = None
    #: Function definitions (`{"type":"function","function":{...}}`) the chat template renders.
    tools: list[dict[str, Any]] | None = None

    @property
    def sampling_changed(self) -> bool:
        return bool(
            self.repeat_penalty != 1.0 or self.presence_penalty or self.frequency_penalty or self.logit_bias
        )

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        defaults = Constraints()
        for name in ("repeat_penalty", "presence_penalty", "frequency_penalty", "penalty_last_n"):
            if getattr(self, name) != getattr(defaults, name):
                body[name] = getattr(self, name)
        if self.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in self.logit_bias.items()}
        if self.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs
        for name in ("grammar", "json_schema", "tools"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        return body


FIELDS = frozenset(Constraints.__dataclass_fields__)


def parse_constraints(body: dict[str, Any], *, chat: bool) -> Constraints:
    out = Constraints()
    out.repeat_penalty = _number(body, "repeat_penalty", 1.0, 0.0, 10.0)
    out.presence_penalty = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    out.frequency_penalty = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    last_n = body.get("penalty_last_n", 64)
    if isinstance(last_n, bool) or not isinstance(last_n, int) or not -1 <= last_n <= 1_000_000:
        raise invalid("penalty_last_n", "expected an integer from -1 (the whole context) to 1000000")
    out.penalty_last_n = last_n
    out.logit_bias = parse_logit_bias(body.get("logit_bias"))
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise invalid("logprobs", "expected a boolean")
    top = body.get("top_logprobs", 0)
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise invalid("top_logprobs", f"expected an integer from 0 to {MAX_TOP_LOGPROBS}")
    if top and not logprobs:
        raise invalid("top_logprobs", "only with logprobs: true")
    out.logprobs, out.top_logprobs = logprobs, top
    grammar, schema = body.get("grammar"), body.get("json_schema")
    if grammar is not None and schema is not None:
        raise invalid("grammar", "give either grammar or json_schema, not both")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise invalid("grammar", "expected GBNF text")
        if len(grammar) > MAX_GRAMMAR_CHARS:
            raise invalid("grammar", f"longer than {MAX_GRAMMAR_CHARS} characters")
        out.grammar = grammar
    if schema is not None:
        out.json_schema = check_json_schema(schema, "json_schema")
    tools = body.get("tools")
    if tools is not None:
        if not chat:
            raise invalid("tools", "only with messages")
        out.tools = parse_tool_definitions(tools, "tools")
    return out


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(name, "expected a number")
    if not lo <= value <= hi:
        raise invalid(name, f"expected {lo:g} to {hi:g}, got {value}")
    return float(value)


def parse_logit_bias(value: Any, name: str = "logit_bias") -> dict[int, float]:
    """OpenAI's map of token id (a string, as JSON keys are) to a bias from -100 to 100."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(name, "expected an object mapping token ids to biases")
    if len(value) > MAX_LOGIT_BIAS:
        raise invalid(name, f"at most {MAX_LOGIT_BIAS} entries")
    out: dict[int, float] = {}
    for key, bias in value.items():
        token = str(key)
        if not token.isdecimal() or not token.isascii() or len(token) > 9:
            raise invalid(name, f"{token[:20]!r} is not a token id")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise invalid(name, f"the bias of token {token} must be a number from -100 to 100")
        out[int(token)] = float(bias)
    return out


def check_json_schema(schema: Any, name: str) -> dict[str, Any]:
    """A JSON schema object whose nested schemas and keywords have the right JSON types."""
    if not isinstance(schema, dict):
        raise invalid(name, "expected a JSON schema object")
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        raise invalid(name, f"longer than {MAX_SCHEMA_CHARS} characters")
    _check_schema(schema, name, 0)
    return schema


def _check_schema(schema: Any, where: str, depth: int) -> None:
    if depth > 32:
        raise invalid(where, "nested more than 32 levels")
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise invalid(where, "expected a schema (an object or a boolean)")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for one in kinds:
        if one not in _TYPES:
            raise invalid(where, f"type {one!r} is not a JSON schema type ({', '.join(sorted(_TYPES))})")
    for key in _SCHEMA_KEYS:
        if key in schema:
            _check_schema(schema[key], f"{where}.{key}", depth + 1)
    for key in _SCHEMA_LISTS:
        if key in schema:
            items = schema[key]
            if not isinstance(items, list) or not items:
                raise invalid(where, f"{key}: expected a non-empty list of schemas")
            for i, item in enumerate(items):
                _check_schema(item, f"{where}.{key}[{i}]", depth + 1)
    for key in _SCHEMA_MAPS:
        if key in schema:
            members = schema[key]
            if not isinstance(members, dict):
                raise invalid(where, f"{key}: expected an object of schemas")
            for member, sub in members.items():
                _check_schema(sub, f"{where}.{key}.{member}", depth + 1)
    required = schema.get("required")
    if required is not None and (
        not isinstance(required, list) or not all(isinstance(r, str) for r in required)
    ):
        raise invalid(where, "required: expected a list of property names")
    enum = schema.get("enum")
    if enum is not None and (not isinstance(enum, list) or not enum):
        raise invalid(where, "enum: expected a non-empty list")
    for key in ("minItems", "maxItems", "minLength", "maxLength"):
        bound = schema.get(key)
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 0):
            raise invalid(where, f"{key}: expected a non-negative integer")
    pattern = schema.get("pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise invalid(where, "pattern: expected a string")
    ref = schema.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
        raise invalid(where, "$ref: only local references (#/...) are supported")


def parse_tool_definitions(tools: Any, name: str) -> list[dict[str, Any]]:
    """OpenAI function tools, each with a name and an object schema for its parameters."""
    if not isinstance(tools, list) or not tools:
        raise invalid(name, "expected a non-empty list of tools")
    if len(tools) > MAX_TOOLS:
        raise invalid(name, f"at most {MAX_TOOLS} tools")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"{name}[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid(f"{where}.type", 'expected "function"')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise invalid(f"{where}.function", "expected an object")
        fname = function.get("name")
        if not isinstance(fname, str) or not FUNCTION_NAME.match(fname):
            raise invalid(f"{where}.function.name", "expected 1-64 letters, digits, '_', '.' or '-'")
        if fname in seen:
            raise invalid(f"{where}.function.name", f"{fname!r} is defined twice")
        seen.add(fname)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid(f"{where}.function.description", "expected a string")
        params = function.get("parameters", {"type": "object", "properties": {}})
        params = check_json_schema(params, f"{where}.function.parameters")
        if params.get("type", "object") != "object":
            raise invalid(f"{where}.function.parameters", "expected a schema of type object")
        clean: dict[str, Any] = {"name": fname, "parameters": params}
        if description is not None:
            clean["description"] = description
        out.append({"type": "function", "function": clean})
    return out
