"""User-facing errors: one line that names the file/row/field and says how to fix it. The CLI exits 2 on them."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (file, row, field, option). The message is the whole story, on one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


def where(path: object, row: int | None = None, field: str | None = None) -> str:
    """Format a location like ``data.json row 12 field 'answer'`` for error messages."""
    loc = str(path)
    if row is not None:
        loc += f" row {row}"
    if field is not None:
        loc += f" field {field!r}"
    return loc
