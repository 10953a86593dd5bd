"""File names whatever their bytes: how to show them and which libraries cannot take them.

On Linux a file name is bytes. Python hands a name that is not valid UTF-8 (a Latin-1
`caf\\xe9.png` copied from an old archive) to us as a str with lone surrogates
(`'caf\\udce9.png'`, PEP 383), and `os.fsencode` gives the bytes back. Python's own file
functions take such a str; C extensions that convert it to UTF-8 do not: OpenCV segfaults,
tensorstore (orbax) and array_record raise a pybind11 cast error. So the readers hand OpenCV
`os.fsencode`d bytes, and paths that must reach tensorstore or array_record are checked with
`require_utf8` before any work.

This module imports nothing of ours but the errors, so every layer, `data/` included, can
use it.
"""

from __future__ import annotations

import os
import re

from fmsd_jax.errors import BadInput

# Lone surrogates other than U+DC80..U+DCFF, the range os.fsdecode uses for bytes 0x80..0xFF.
_NOT_AN_ESCAPE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def shown(path: str | os.PathLike | bytes) -> str:
    """`path` (or a message naming paths) as text that prints anywhere: valid UTF-8
    unchanged, each undecodable byte as `\\xe9`, so a message names the file readably instead
    of raising UnicodeEncodeError on a strict stdout, or writing raw bytes that a UTF-8
    terminal shows as mojibake. A surrogate that no file name can hold (a JSON's
    `"\\ud800"`) is shown as `\\ud800`."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    text = _NOT_AN_ESCAPE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def require_utf8(path: str | os.PathLike, what: str, written: str) -> None:
    """Refuse, in one line, a path that a C++ library taking UTF-8 paths only (tensorstore
    for orbax checkpoints, array_record for TFDS files) would fail on after the work before
    it was spent: one whose bytes, made absolute, are not valid UTF-8. `what` names the flag
    or config field to change, `written` what cannot be written there."""
    full = os.path.abspath(os.fspath(path))
    try:
        full.encode("utf-8")
    except UnicodeEncodeError:
        where = shown(path) if full == os.fspath(path) else f"{shown(path)} ({shown(full)})"
        raise BadInput(
            f"{what} {where} is not valid UTF-8, and {written} cannot be written or read "
            "under such a path (the library takes UTF-8 paths only); rename the folder or give "
            "a UTF-8 path") from None
