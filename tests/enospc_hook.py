"""`python tests/enospc_hook.py ARGS` = `python -m fmsd_jax.main ARGS` on a disk that is full for
every path containing $ENOSPC_AT: opening such a path for writing fails with ENOSPC, as a full
filesystem fails it. The stand-in for a small tmpfs where the test may not mount one; it reaches
only Python's own writes (orbax's metadata, grain's iterator state), not tensorstore's."""

from __future__ import annotations

import builtins
import errno
import io
import os
import runpy
import sys

_FULL_AT = os.environ["ENOSPC_AT"]
_open = io.open


def _full_open(file, mode="r", *args, **kwargs):
    if isinstance(file, str | os.PathLike) and set(mode) & set("wax+") \
            and _FULL_AT in os.fspath(file):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))
    return _open(file, mode, *args, **kwargs)


if __name__ == "__main__":
    builtins.open = io.open = _full_open
    sys.path.insert(0, os.getcwd())  # the checkout's fmsd_jax, as `python -m` would import it
    runpy.run_module("fmsd_jax.main", run_name="__main__", alter_sys=True)
