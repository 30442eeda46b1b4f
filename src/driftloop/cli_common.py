"""What every driftloop command shares: a user's error as one line and a non-zero exit code."""

from __future__ import annotations

import functools

import typer


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def clean_errors(fn):
    """Turn the errors a user can cause into one readable line and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from driftloop.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as err:
            _fail(str(err))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as err:  # the registry's own errors (unknown model or version) are user errors too
            if type(err).__name__ != "MlflowException":
                raise
            _fail(str(err).splitlines()[0])

    return wrapper
