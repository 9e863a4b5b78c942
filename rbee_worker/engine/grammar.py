"""JSON schema → GBNF with llama-cpp-python's converter, and the check that llama.cpp takes a grammar."""

from __future__ import annotations

import json
from typing import Any

from llama_cpp.llama_grammar import json_schema_to_gbnf

from .sampling import GrammarError, check_grammar

__all__ = ["GrammarError", "check_grammar", "schema_grammar"]


#: The converter's string character admits control characters, which JSON forbids unescaped (a strict
#: parser such as Python's `json.loads` refuses them); llama.cpp's own converter has since excluded them.
_LOOSE_CHAR = r'char ::= [^"\\] |'
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'


def schema_grammar(schema: dict[str, Any]) -> str:
    """The GBNF for `schema`; GrammarError when the converter cannot express it.

    The converter is Python code fed untrusted input: any exception it raises
    (a KeyError on a malformed keyword, a ValueError on an unknown format…)
    means the schema is not one it understands.
    """
    try:
        return json_schema_to_gbnf(json.dumps(schema)).replace(_LOOSE_CHAR, _JSON_CHAR)
    except RecursionError:
        raise GrammarError("the schema nests or refers to itself too deeply") from None
    except Exception as exc:
        raise GrammarError(
            f"cannot turn the schema into a grammar: {type(exc).__name__}: {exc}"[:300]
        ) from None
