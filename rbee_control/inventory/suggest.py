"""'Did you mean …?' for names a person typed: node names, inventory keys, backends."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The most similar choice, if any is similar enough to be a likely typo."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`"; did you mean 'x'?"` or the empty string, ready to append to a message."""
    match = closest(word, choices)
    return f"; did you mean {match!r}?" if match else ""
