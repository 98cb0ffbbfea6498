"""What a user can fix, and how every command-line entry point reports it.

``UserError`` (a ``ValueError``) is raised for input the user controls: a setting, a path, a
dataset, a checkpoint that does not fit. Its message names the problem and the fix. Every CLI
runs under :func:`reports_user_errors`, which prints that message on stderr and exits with status
2, without a traceback; anything else (a bug) keeps its traceback. Packages below ``emu_world``
(``envs``: a machine that cannot render) mark their own such errors with a true ``user_fixable``
class attribute instead of importing this module.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

USER_ERROR_EXIT = 2


class UserError(ValueError):
    """Input the user can fix; the message says how."""

    user_fixable = True


class MissingInputError(UserError, FileNotFoundError):
    """A file or folder the command needs is not there (or is not what it should be)."""


class ExistingOutputError(UserError, FileExistsError):
    """The command would overwrite something that is already there."""


def reports_user_errors(main: F) -> F:
    """Wrap a CLI's entry function: a :class:`UserError` (or another exception marked ``user_fixable``)
    ends the process with its message (and the fix it names) on stderr and exit status 2, no traceback."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as e:
            if not getattr(e, "user_fixable", False):
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(USER_ERROR_EXIT) from None

    return run  # type: ignore[return-value]
