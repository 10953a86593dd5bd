"""WORKDIR/run.json: what produced a workdir's results, so a result can be traced and rerun.

One entry per mode (train, evaluate, ...), each rewritten by that mode's latest invocation:
the command line, the working directory, Python and package versions, the devices, the code's
git commit (when the code runs from a git checkout) and the data fingerprint of every
(dataset, split) the mode read (`preflight.check_data`). Kept out of results.json on purpose:
results.json holds only numbers the computation determines, so the same command gives the same
bytes (the manifest holds times and paths that differ between runs).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax

from fmsd_jax import atomic
from fmsd_jax.run.workdir_files import RUN_JSON

log = logging.getLogger("fmsd_jax")
PACKAGES = ("fmsd_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
            "numpy", "ml_collections", "opencv-python-headless", "albumentations")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """{'commit', 'dirty'} of the checkout holding the code, None outside git."""
    where = Path(path or Path(__file__).resolve().parent)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def describe(mode: str, data: dict[str, dict]) -> dict[str, Any]:
    """The manifest entry of this process's run of `mode`."""
    devices = jax.devices()
    return {
        "mode": mode,
        "command": shlex.join([os.path.basename(sys.executable), *_argv()]),
        "cwd": os.getcwd(),
        "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: v for p in PACKAGES if (v := _version(p)) is not None},
        "devices": {"backend": jax.default_backend(), "count": len(devices),
                    "kinds": sorted({d.device_kind for d in devices}),
                    "processes": jax.process_count()},
        "git": git_state(),
        "data": data,
    }


def _argv() -> list[str]:
    """`-m fmsd_jax.main ...` when run as a module (sys.argv[0] is then the file path)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("fmsd_jax", "main.py")):
        argv = ["-m", "fmsd_jax.main", *argv[1:]]
    return argv


def read(workdir: str | os.PathLike) -> dict[str, Any]:
    path = Path(workdir) / RUN_JSON
    return atomic.read_json(path) if path.is_file() else {}


def record(workdir: str | os.PathLike, mode: str, data: dict[str, dict]) -> dict[str, Any]:
    """Write this run's entry into WORKDIR/run.json (process 0) and return it."""
    entry = describe(mode, data)
    if jax.process_index() == 0:
        manifest = read(workdir)
        manifest[mode] = entry
        atomic.write_json(Path(workdir) / RUN_JSON, manifest)
    return entry


def data_changes(workdir: str | os.PathLike, data: dict[str, dict]) -> list[str]:
    """The (dataset/split)s read now whose records differ from those the training run read."""
    trained = read(workdir).get("train", {}).get("data", {})
    return [key for key, info in data.items()
            if key in trained and trained[key].get("sha256") != info.get("sha256")]


def warn_if_data_changed(workdir: str | os.PathLike, data: dict[str, dict]) -> list[str]:
    changed = data_changes(workdir, data)
    if changed:
        log.warning(
            "the data of %s differs from what the training run read (fingerprints in %s): "
            "frames were added, removed or relabelled since, so these results are not those "
            "of the training run's data", ", ".join(changed), Path(workdir) / RUN_JSON)
    return changed


def citation(workdir: str | os.PathLike, mode: str) -> str:
    """One line for results.md: where the manifest is and what the `mode` entry pins."""
    entry = read(workdir).get(mode)
    if not entry:
        return ""
    git = entry.get("git") or {}
    code = (f"code {git['commit'][:12]}{' (uncommitted changes)' if git.get('dirty') else ''}"
            if git else "code outside git")
    data = ", ".join(f"{k} {v['sha256'][:12]}" for k, v in entry.get("data", {}).items())
    return (f"Produced by `{entry['command']}` ({code}; jax {entry['packages'].get('jax')}; "
            f"{entry['devices']['count']} {entry['devices']['backend']} device(s)); data "
            f"fingerprints: {data or 'none'}. Full manifest: {RUN_JSON}.")
