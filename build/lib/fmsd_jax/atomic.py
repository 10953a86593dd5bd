"""Atomic file writes that respect the user's umask, and the record of what a process wrote.

`tempfile.mkstemp` creates its file with mode 0600 whatever the umask, so a file written through
it and renamed into place stays unreadable to the user's group (on a shared cluster, the group
that needs the results). Here the temporary file gets the mode a plain `open(path, 'w')` would
give it, 0666 & ~umask, before it is renamed onto the target.

Every writer of fmsd_jax goes through here (`write_text`, `write_json`, or `replacing` for a
library that writes a file itself: savefig, safetensors), and JSON is read back with
`read_json`, which names a damaged file in one line.

Every file written here, and every output another writer reports through `note_written`
(orbax checkpoint steps, TensorBoard event folders), is remembered with whether it replaced an
earlier file, so that a mode can end by saying exactly what it wrote and what it replaced
(`written()`, printed by `fmsd_jax.main`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fmsd_jax.errors import BadInput, writing
from fmsd_jax.pathnames import shown

# path -> True when it replaced a file that existed before this process first wrote it.
_WRITTEN: dict[Path, bool] = {}


def note_written(path: str | os.PathLike, replaced: bool) -> None:
    """Remember an output of this process; the first write decides whether it was new."""
    path = Path(os.path.abspath(path))
    _WRITTEN[path] = _WRITTEN.get(path, replaced)


def written() -> dict[Path, bool]:
    """Every output this process wrote, in the order first written: path -> replaced."""
    return dict(_WRITTEN)


def describe_written(base: str | os.PathLike) -> list[str]:
    """Lines that list this process's outputs, new and replaced, relative to `base` where they
    lie under it; outputs removed since (old checkpoint steps past max_to_keep) share a line."""
    base = Path(os.path.abspath(base))
    entries = written()
    if not entries:
        return [f"wrote no file (in {base} or elsewhere)"]
    replaced = sum(entries.values())
    lines = [f"wrote {len(entries)} output(s), {len(entries) - replaced} new and {replaced} "
             f"replacing an earlier file, in {base}:"]
    gone = []
    for path, was in entries.items():
        name = os.fspath(path.relative_to(base) if path.is_relative_to(base) else path)
        if not os.path.lexists(path):
            gone.append(name)
            continue
        lines.append(f"  {'replaced' if was else 'new':<8} {name}{'/' if path.is_dir() else ''}")
    if gone:
        lines.append(f"  removed since: {', '.join(gone)}")
    return lines


def forget_written() -> None:
    """Start a new record (a test running several modes in one process)."""
    _WRITTEN.clear()


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
        replaced = path.exists()
        os.replace(tmp, path)
        note_written(path, replaced)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text, with a file name that is not valid UTF-8 (a surrogate-escaped str, which
    strict UTF-8 cannot encode) written as `pathnames.shown` prints it (`caf\\xe9`), so a
    report naming such a dataset is written rather than lost to UnicodeEncodeError. JSON is
    unchanged: json.dumps escapes those characters itself (`\\udce9`, which json.loads
    reverses)."""
    with replacing(path) as tmp:
        tmp.write_text(shown(text), encoding="utf-8")


def jsonable(obj: Any) -> Any:
    """`obj` with tuples as lists, keys as str and arrays (numpy or jax, anything with a dtype
    and `tolist`) as nested lists or Python scalars: what json.dumps takes. Duck-typed, so
    this module imports neither numpy nor jax (evaluators/result_files.py must stay
    importable without jax)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "dtype") and hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


def write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True,
               allow_nan: bool = True) -> None:
    """`obj` as indented JSON through `write_text`. `sort_keys=False` keeps a mapping's own
    order (a results table's datasets); `allow_nan=False` refuses NaN/inf, which strict JSON
    readers reject (results files), instead of writing them."""
    write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=sort_keys,
                                allow_nan=allow_nan) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """One of the run's own JSON files; a damaged one (truncated by a copy, edited by hand) is
    named in one line rather than as a JSONDecodeError traceback."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path} is not valid JSON ({e}); it is damaged (truncated, or edited): "
                       "restore it from a copy of the workdir, or use another --workdir") from e


def claim(path: str | os.PathLike) -> Path:
    """Create `path` empty with O_EXCL (FileExistsError when it exists, so two processes can
    never both claim it), recorded as new; the caller then writes it through `replacing`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    note_written(path, False)
    return path


def claim_free_name(path: str | os.PathLike) -> Path:
    """`claim` of `path`, or of the first free `stem-N.suffix` beside it (N = 2, 3, ...)."""
    path = Path(path)
    n = 1
    while True:
        try:
            return claim(path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}"))
        except FileExistsError:
            n += 1


def release_unfilled(path: str | os.PathLike) -> None:
    """Remove a claim that was never written (the mode failed before its output)."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        path.unlink()
