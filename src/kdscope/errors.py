"""User-facing errors: one line that names the file/row/field and says how to fix it. The CLI exits 2 on them."""

from __future__ import annotations

from typing import Callable, Sequence

from pydantic import ValidationError

Loc = Sequence["int | str"]


class InputError(ValueError):
    """Bad user input (file, row, field, option). The message is the whole story, on one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def where(path: object, index: int | None = None, field: str | None = None) -> str:
    """Format a location like ``data.json row 12 (1-based) field 'answer'`` for error messages.

    ``index`` is the row's 0-based position (what ``enumerate`` gives); users count from 1, and say so.
    """
    loc = str(path)
    if index is not None:
        loc += f" row {index + 1} (1-based)"
    if field is not None:
        loc += f" field {field!r}"
    return loc


def dotted(loc: Loc) -> str:
    """A pydantic error location as a YAML key path: ``training.kd.max_steps``, ``families.0.name``."""
    return ".".join(str(part) if part != "" else "''" for part in loc)  # an empty key is shown, not lost


_MAX_SHOWN = 60  # characters of a bad value quoted back; generated or pasted values can be huge

# pydantic puts these in front of messages raised by validators; they say nothing to a user
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def describe(error: ValidationError, name: Callable[[Loc], str] = dotted) -> str:
    """The first problem of ``error`` as ``<key>: <what is wrong> (got <value>)<hint>``.

    ``name`` turns pydantic's location into what the user typed: a YAML key path, or a command-line option.
    A problem found by a whole-model validator has no location; its message names the key itself.
    """
    err = error.errors()[0]
    msg = str(err["msg"])
    for prefix in _PYDANTIC_PREFIXES:
        msg = msg.removeprefix(prefix)
    loc = tuple(err["loc"])
    value = err.get("input")
    got = ""
    shown = repr(value)
    if loc and not isinstance(value, (dict, list)) and shown not in msg:  # a validator's message may quote it already
        got = f" (got {shown if len(shown) <= _MAX_SHOWN else shown[:_MAX_SHOWN] + '...'})"
    hint = " - remove it or check the spelling" if err["type"] == "extra_forbidden" else ""
    more = len(error.errors()) - 1
    tail = f" [and {more} more problem{'s' if more > 1 else ''}]" if more else ""
    return f"{name(loc) + ': ' if loc else ''}{msg}{got}{hint}{tail}"


def one_line(error: ValidationError, prefix: str = "", name: Callable[[Loc], str] = dotted) -> InputError:
    """The one translation of a pydantic ValidationError into a user-facing `InputError`.

    ``prefix`` says where the settings came from (a file name; empty for command-line options). Raise the result
    ``from None``: the pydantic report is long, and every part of it a user needs is on this line.
    """
    text = describe(error, name)
    return InputError(f"{prefix}: {text}" if prefix else text)
