"""The line between the user's mistakes and ours.

A `UserError` is raised for anything the user can fix from the command line: a path, a config
file or argument, an unreadable input, an unknown dataset, a diverged run. `fmsd_jax.main`
prints its message on one line and exits with status 2; every other exception is a bug and
keeps its traceback. The subclasses also derive from the built-in exception a caller would
expect (FileNotFoundError, ValueError, FloatingPointError), so library callers can keep
catching those.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; the message names the thing and the fix, on one line."""


class InputNotFound(UserError, FileNotFoundError):
    """A path the user gave (or a config field names) does not exist."""


class BadInput(UserError, ValueError):
    """A config value, argument or input file that cannot be used as it is."""


class TrainingDiverged(UserError, FloatingPointError):
    """The loss became NaN/inf: a setting to change, not a bug to trace."""


class UnknownName(UserError, KeyError):
    """A dataset, split, label group or key the data does not have."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class AlreadyExists(UserError, FileExistsError):
    """An output the run would replace or mix with, which the user has to move or name."""


class WorkdirInUse(UserError, BlockingIOError):
    """Another process holds the workdir's lock (fmsd_jax/workdir_lock.py): two runs writing one
    workdir would mix their checkpoints and results."""
