"""User-facing errors.

Everything a user can get wrong (a config field, a flag, a data file, a checkpoint) raises a
`UserError` subclass whose message names the bad value and the fix. The command line prints the
message alone (no traceback) and exits with status 2; library callers can catch the class.
"""

from __future__ import annotations

import difflib


class UserError(Exception):
    """An error caused by input the user controls; the message says what to change."""


class ConfigError(UserError, ValueError):
    """A model or training configuration value is invalid."""


class DataError(UserError):
    """Input data is missing, empty or malformed."""


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, corrupted or does not match the model."""


def suggest(name: str, choices) -> str:
    """Return ' (did you mean X?)' for the nearest of `choices`, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def utf8_text(text: str, where: str) -> str:
    """`text` if it is valid Unicode; bytes that were not UTF-8 (argv and stdin decode them as lone
    surrogates under surrogateescape) raise one DataError naming where they are."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = ord(text[e.start])
        what = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"character \\u{ch:04x}"
        raise DataError(f"{where}: not valid UTF-8 text ({what} at character {e.start}); give UTF-8 text "
                        "(e.g. convert it with `iconv -t utf-8`)") from None
    return text
