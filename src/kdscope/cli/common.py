"""The typer app every command registers on, and the one-line error handling they share.

Every command turns an `InputError` into a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import typer

from .. import __version__
from ..errors import InputError

app = typer.Typer(
    help="kdscope: run, measure and explain knowledge-distillation studies of causal language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
F = TypeVar("F", bound=Callable[..., object])


def user_errors(fn: F) -> F:
    """Report bad input as one line on stderr with exit code 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
            # a path given on the command line that is of the wrong kind (a file where a folder goes, ...)
            typer.echo(f"error: {e.filename or 'a path'}: {e.strerror or e}; check the paths given on the command line",
                       err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def output_folder(path: Path, option: str = "--out") -> Path:
    """Refuse an output folder that names an existing file before any work starts (and never overwrite the file)."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path}: is a file; give a folder (new or from an earlier run)")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise InputError(f"{option} {path}: {blocking} is a file, so no folder can be made inside it")
    return path


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kdscope {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Distil teachers into students, evaluate them on the study's 14 tasks, and analyse the results."""


# TrainSettings fields whose command-line option is not simply the field name with dashes
_OPTION_OF_FIELD = {"kd_weight": "--weight", "lmbda": "--lambda", "objective": "--objective"}


def option_name(loc: Sequence[object]) -> str:
    """The option a user typed for a TrainSettings field (pydantic reports the field: kd_weight is --weight)."""
    field = str(loc[0])
    return _OPTION_OF_FIELD.get(field, "--" + field.replace("_", "-"))
