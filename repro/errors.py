"""The error a mistake in a config, study or paper file raises, and help for its message.

Everything that reads a file raises ConfigError, so it lives here, below every reader, rather than beside any one of
them; the message names what is wrong and, where a near miss is likely, what would be right.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A mistake in a configuration file or value; the message is one line naming where.

    `key` (dotted, relative to the dataclass that raised it) lets the loader (`repro.yamlio.from_dict`) add the file
    and line.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(f"{key}: {message}" if key else message)
        self.key, self.detail = key, message


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean X, Y?)' for the closest choices, by spelling or by prefix; '' when nothing is close."""
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=n)
    for c in choices:
        if c not in close and len(close) < n and min(len(c), len(word)) >= 3 and (
                c.startswith(word) or word.startswith(c)):
            close.append(c)
    return f" (did you mean {', '.join(close)}?)" if close else ""
