"""The one CLI convention every entry point shares (jobs, tune, serve, cluster).

A bad config or argument prints `error: <what, naming the file and field>` on stderr and exits 2
before anything runs; a failure while running exits 1. Typer's own pretty tracebacks are off: the
last line of a failed `ray job submit` or CI log is the cause.

    app = cli.app()                    # a module with several commands (tune.registry)

    @app.command()
    @cli.config_errors_exit_2
    def main(...): ...

    if __name__ == "__main__":
        cli.run(main)                  # a module with one command
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

import typer

from core.config import ConfigError

F = TypeVar("F", bound=Callable)


def app(**kwargs) -> typer.Typer:
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, **kwargs)


def fail(message: object, code: int = 2) -> NoReturn:
    """Print `error: message` on stderr and exit with `code` (2: bad input, 1: a failed run)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def config_errors_exit_2(fn: F) -> F:
    """A command whose ConfigError becomes `error: ...` and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            fail(e)

    return wrapper  # type: ignore[return-value]


def run(fn: Callable) -> None:
    """Run a one-command module's `main`, with ConfigError -> exit 2."""
    one = app()
    one.command()(config_errors_exit_2(fn))
    one()
