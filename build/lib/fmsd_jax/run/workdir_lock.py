"""One run per workdir: an OS lock on WORKDIR/.lock, held by the modes that write the workdir.

Why: two training commands on one workdir (a second terminal, a scheduler retrying a job that
is still running) both ran to the end, interleaving their checkpoints, results.json and
run.json. Now the second refuses at once, in one line that names the first (exit 2).

Which modes take it (`fmsd_jax.main`, right after the config is checked, before any data is
read or anything compiled; held until the process exits): train, mask, evaluate and
robustness. Each rewrites files of the workdir (checkpoints, layer_mask.json, results.json,
robustness.json) and run.json, whose per-mode entries are read, updated and replaced, so even
two different modes at once would lose one's entry. The demo (configs/demo.py) also locks each
row's workdir, because a row can be trained by its own command as well. predict, export and plan
take no lock: they only read the run and write a file of their own (a predictions file claimed
without replacing any, the export directory, plan.json), so they may run beside a training run.

How: `fcntl.flock(LOCK_EX | LOCK_NB)` on a file that is never removed. The kernel drops the lock
when the holder dies, however it dies (kill -9, out of memory), so no stale lock survives a
crash; deleting the file instead would let a third process lock a fresh file while a second
still holds the old one. A run's descriptor is not inherited by what it starts (Python's
descriptors are non-inheritable and grain spawns its workers), so a worker outliving a killed
run cannot keep the lock. After taking the lock the holder writes its pid, host, mode, start time
and command into the file: all that a refusal needs to name it. The file is hidden and nothing
reads the workdir's listing, so it changes no check of what a workdir holds.

Multi-host runs: every process writes its own shards of each checkpoint and process 0 the rest,
so each process locks its own file, `.lock` for process 0 and `.lock.pN` for process N: the
processes of one run never refuse one another, while a second run's process N meets the first's.
On NFS, Linux implements flock with the server's locks, so hosts sharing a workdir see each
other's; a filesystem without flock (some FUSE mounts) gets a warning and no lock, not no run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from fmsd_jax.errors import BadInput, WorkdirInUse
from fmsd_jax.run.workdir_files import LOCK_FILE

log = logging.getLogger("fmsd_jax")
# The modes that write into the workdir (see the module docstring for why these and only these).
LOCKING_MODES = ("train", "mask", "evaluate", "robustness")
# flock failing for want of support rather than because someone holds the lock.
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_HOLDER_WRITE_WAIT_S = 1.0  # a holder writes its details just after locking; wait that long


def lock_path(workdir: str | os.PathLike, process_index: int = 0) -> Path:
    """The file that process `process_index` of a run locks in WORKDIR."""
    name = LOCK_FILE if process_index == 0 else f"{LOCK_FILE}.p{process_index}"
    return Path(workdir) / name


@contextlib.contextmanager
def exclusive(workdir: str | os.PathLike, mode: str, *, process_index: int = 0,
              create: bool = True) -> Iterator[Path | None]:
    """Hold WORKDIR's lock for this process during the block; `WorkdirInUse` at once if another
    process holds it. Yields the lock file, or None where nothing was locked.

    `create=False` (modes that read a finished run) leaves a workdir that does not exist
    uncreated and unlocked, so the mode can say it was never trained without having made it."""
    workdir = Path(workdir)
    if not create and not workdir.is_dir():
        yield None
        return
    path = lock_path(workdir, process_index)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except (FileExistsError, NotADirectoryError, PermissionError) as e:
        raise BadInput(f"--workdir {workdir}: cannot create or write it ({e.strerror}); "
                       "give a directory you can write") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirInUse(_refusal(workdir, path)) from None
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            log.warning("%s: the filesystem does not support locks (%s), so a second run on "
                        "this workdir would not be refused", path, e.strerror)
            yield None
            return
        _write_holder(fd, path, mode, process_index)
        yield path
    finally:
        os.close(fd)  # releases the lock


def _write_holder(fd: int, path: Path, mode: str, process_index: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "mode": mode,
              "process": process_index, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": shlex.join(sys.argv)}
    data = (json.dumps(record) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError as e:  # a full disk at the start: named like any other write (errors.py)
        raise OSError(e.errno, e.strerror, str(path)) from None


def read_holder(path: str | os.PathLike) -> dict | None:
    """What the lock's holder wrote about itself, None while it has not written it yet."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _refusal(workdir: Path, path: Path) -> str:
    deadline = time.monotonic() + _HOLDER_WRITE_WAIT_S
    while (holder := read_holder(path)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if holder is None:
        who = f"another process (which has not written its pid to {path} yet)"
    else:
        process = holder.get("process") or 0
        who = (f"pid {holder.get('pid')} on {holder.get('host')} (mode {holder.get('mode')}, "
               f"started {holder.get('started')}"
               f"{f', process {process} of a multi-host run' if process else ''})")
    return f"{workdir} is in use by {who}: wait for it or use another --workdir"
