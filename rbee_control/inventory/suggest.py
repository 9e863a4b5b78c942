"""'Did you mean …?' for names a person typed: node names, inventory keys, backends."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The most similar choice, if any is similar enough to be a likely typo.

    Short names get a lower bar: one wrong character in `n4` is half of it.
    """
    options = list(choices)
    cutoff = 0.6 if len(word) > 4 else 0.5
    matches = difflib.get_close_matches(word, options, n=1, cutoff=cutoff)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`"; did you mean 'x'?"` or the empty string, ready to append to a message."""
    match = closest(word, choices)
    return f"; did you mean {match!r}?" if match else ""
