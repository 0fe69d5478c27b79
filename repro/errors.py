"""Helpers for error messages that name what is wrong and what would be right."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean X, Y?)' for the closest choices, by spelling or by prefix; '' when nothing is close."""
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=n)
    for c in choices:
        if c not in close and len(close) < n and min(len(c), len(word)) >= 3 and (
                c.startswith(word) or word.startswith(c)):
            close.append(c)
    return f" (did you mean {', '.join(close)}?)" if close else ""
