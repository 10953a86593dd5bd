"""The line between the user's mistakes and ours.

A `UserError` is raised for anything the user can fix from the command line: a path, a config
file or argument, an unreadable input, an unknown dataset, a diverged run. `fmsd_jax.main`
prints its message on one line and exits with status 2; every other exception is a bug and
keeps its traceback. The subclasses also derive from the built-in exception a caller would
expect (FileNotFoundError, ValueError, FloatingPointError), so library callers can keep
catching those.

A full disk or quota is the user's to fix too (free space, rerun), but it reaches us as whatever
the library that was writing raises, from wherever it wrote: `disk_full` recognises it in any
exception's chain and turns it into a `DiskFull` line.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path


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
    """Another process holds the workdir's lock (fmsd_jax/run/workdir_lock.py): two runs writing one
    workdir would mix their checkpoints and results."""


class DiskFull(UserError, OSError):
    """The disk or the user's quota filled up while the run wrote: space to free, then the same
    command resumes (orbax finalizes a checkpoint by a rename, so the last one is whole)."""


_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
# The errno where a library kept only its text: Python's "[Errno 28]", tensorstore's
# "[os_error_code='28']" (a ValueError), or the C library's own words.
_CODE_IN_TEXT = re.compile(r"\[Errno (\d+)\]|os_error_code='?(\d+)|("
                           + "|".join(os.strerror(c) for c in _DISK_FULL) + ")")
_BY_TEXT = {os.strerror(c): c for c in _DISK_FULL}
_QUOTED_PATH = re.compile(r"""["'](/[^"']+)["']""")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Puts `path` into an OSError raised inside that names no file (a failed write() or flush()
    does not), so that a full disk's line says what was being written."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = os.fspath(path)
        raise


def disk_full_code(exc: BaseException | str) -> int | None:
    """ENOSPC or EDQUOT when `exc` (an exception, its chain, or a log message) says the disk or
    quota is full, else None."""
    chain = [exc] if isinstance(exc, str) else _chain(exc)
    return next((code for e in chain if (code := _own_code(e))), None)


def _own_code(e: BaseException | str) -> int | None:
    """ENOSPC/EDQUOT when this exception itself (not its chain) says the disk is full."""
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return e.errno
    for number, code, text in _CODE_IN_TEXT.findall(str(e)):
        found = _BY_TEXT[text] if text else int(number or code)
        if found in _DISK_FULL:
            return found
    return None


def disk_full(exc: BaseException, workdir: str | os.PathLike | None = None) -> DiskFull | None:
    """The one-line DiskFull for an exception whose chain holds ENOSPC/EDQUOT, however the
    library raised it (tensorstore: a ValueError with the code in its text; orbax: re-raised at
    the next save or wait from the thread that wrote); None for any other error. It names the
    file being written (the error's filename, else the last path its text quotes, else a file
    open for writing in the failing frames, else WORKDIR) and the space left where it lives."""
    code = disk_full_code(exc)
    if code is None:
        return None
    path = _written_path(exc) or (Path(workdir) if workdir else None)
    where = ""
    if path is not None:
        free, mount = _space_left(path)
        where = f" writing {path}" + (f" ({_size(free)} free on {mount})" if mount else "")
    return DiskFull(f"{_DISK_FULL[code]}{where}: free space or move the workdir, then rerun the "
                    "same command (a training run resumes from its last finalized checkpoint)")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """exc, then its causes and contexts (and an exception group's members), each once."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def _written_path(exc: BaseException) -> Path | None:
    full = [e for e in _chain(exc) if _own_code(e)]
    for e in full:
        if isinstance(e, OSError) and isinstance(e.filename, str):
            return Path(e.filename)
    for e in full:
        if quoted := _QUOTED_PATH.findall(str(e)):
            return Path(quoted[-1])  # tensorstore quotes the database, then the file
    for e in full:  # a write() fails without a name; the frames that called it hold the file
        tb, frames = e.__traceback__, []
        while tb is not None:
            frames.append(tb.tb_frame)
            tb = tb.tb_next
        for frame in reversed(frames):
            for value in frame.f_locals.values():
                if isinstance(value, io.IOBase) and isinstance(getattr(value, "name", None), str) \
                        and set(getattr(value, "mode", "")) & set("wax+"):
                    return Path(value.name)
    return None


def _space_left(path: Path) -> tuple[int, Path | None]:
    """(bytes free to this user, mount point) of the filesystem holding `path`."""
    p = path.absolute()
    try:
        while not p.exists() and p != p.parent:
            p = p.parent
        free = shutil.disk_usage(p).free
        while not os.path.ismount(p):
            p = p.parent
    except OSError:
        return 0, None
    return free, p


def _size(n: float) -> str:
    """12 KiB, 3.4 GiB."""
    units = iter(("B", "KiB", "MiB", "GiB", "TiB"))
    unit = next(units)
    while n >= 1024 and unit != "TiB":
        n, unit = n / 1024, next(units)
    return f"{n:.0f} {unit}" if n >= 10 or unit == "B" else f"{n:.1f} {unit}"
