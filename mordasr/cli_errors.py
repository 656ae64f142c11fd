"""The one error path of every ``mordasr-*`` command: a one-line reason on stderr, exit code 2.

``CommandError`` is a ``click.ClickException``, so click prints it and exits; ``fail_on_errors``
turns the library's own errors (``MordasrError``, and ``ValueError`` from validation) raised in its
block into one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

import click

from mordasr.errors import MordasrError, first_line


class CommandError(click.ClickException):
    exit_code = 2

    def __init__(self, message: str, prog: str | None = None, exit_code: int = 2) -> None:
        super().__init__(message)
        self.prog = prog or (click.get_current_context(silent=True).info_name
                             if click.get_current_context(silent=True) else "mordasr")
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"{self.prog}: error: {self.format_message()}", err=True, file=file)


def fail(message: str, prog: str | None = None, exit_code: int = 2) -> NoReturn:
    """Stop the command with a one-line reason."""
    raise CommandError(message, prog, exit_code)


@contextmanager
def fail_on_errors(prog: str | None = None,
                   errors: tuple[type[BaseException], ...] = (MordasrError, ValueError)) -> Iterator[None]:
    try:
        yield
    except errors as err:
        raise CommandError(first_line(err), prog, getattr(err, "exit_code", 2)) from None


def failer(prog: str) -> Callable[..., NoReturn]:
    """``fail`` bound to one command's name (``_fail = failer("mordasr-run")``)."""
    def fail_here(message: str, exit_code: int = 2) -> NoReturn:
        raise CommandError(message, prog, exit_code)

    return fail_here
