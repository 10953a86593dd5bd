"""Atomic file writes that respect the user's umask.

`tempfile.mkstemp` creates its file with mode 0600 whatever the umask, so a file written through
it and renamed into place stays unreadable to the user's group (on a shared cluster, the group
that needs the results). Here the temporary file gets the mode a plain `open(path, 'w')` would
give it, 0666 & ~umask, before it is renamed onto the target.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fmsd_jax.errors import writing


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (threads may be
    creating files meanwhile), else by the set-and-restore idiom."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is renamed onto `path` (readers
    never see half a file), on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with writing(path):  # a full disk is reported as writing `path`, not the temporary
            yield Path(tmp)
        # After the writer: some (safetensors) replace the file rather than write into it.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
