"""A full disk or quota, anywhere in a run, ends in one line naming the file being written and the
space left (exit 2). A real run filling a small disk mid-checkpoint, and resuming elsewhere, is
in tests/test_train.py (it shares that module's uninterrupted reference run)."""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import threading

import pytest

from fmsd_jax import atomic, errors, main

ENOSPC = os.strerror(errno.ENOSPC)
# What tensorstore raises (through orbax) when a checkpoint's array write finds the disk full.
TENSORSTORE = ('RESOURCE_EXHAUSTED: Error writing "trainable.head_bias/0" in OCDBT database at '
               'local file "{d}/ocdbt.process_0/": Failed writing: "{d}/ocdbt.process_0/d/ab12": '
               f"Failed to write 6914 bytes to file 22: {ENOSPC} [os_error_code='28']")


def test_enospc_and_edquot_name_the_file_and_the_space_left(tmp_path):
    full = errors.disk_full(OSError(errno.ENOSPC, ENOSPC, str(tmp_path / "results.json")))
    mount = next(p for p in [tmp_path, *tmp_path.parents] if os.path.ismount(p))
    assert re.fullmatch(
        rf"no space left on device writing {tmp_path}/results.json \(\d+(\.\d)? [KMGT]?i?B "
        rf"free on {mount}\): free space or move the workdir, then rerun the same command "
        r"\(a training run resumes from its last finalized checkpoint\)", str(full)), str(full)
    assert isinstance(full, errors.UserError)
    quota = errors.disk_full(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path)))
    assert str(quota).startswith(f"disk quota exceeded writing {tmp_path} (")
    for other in (OSError(errno.ENOENT, "No such file", "x"), ValueError("[Errno 2] gone"),
                  RuntimeError("Event loop is closed")):
        assert errors.disk_full(other) is None


def test_found_however_the_library_raised_it(tmp_path):
    ckpt = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp" / "state"
    # tensorstore: a ValueError whose text holds the code and the file, last of its paths
    assert f"writing {ckpt}/ocdbt.process_0/d/ab12 (" in str(
        errors.disk_full(ValueError(TENSORSTORE.format(d=ckpt))))
    # orbax re-raising it from its writer thread, or a later error raised while handling it
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", str(ckpt))
        except OSError as e:
            raise RuntimeError("Event loop is closed") from e
    except RuntimeError as e:
        assert str(errors.disk_full(e)).startswith(f"disk quota exceeded writing {ckpt} (")
    # a write() that names no file: the file open for writing in the failing frames
    target = tmp_path / "layer_scores.png"
    try:
        with open(target, "wb") as f:
            f.write(b"x")
            raise OSError(errno.ENOSPC, ENOSPC)
    except OSError as e:
        assert f"writing {target} (" in str(errors.disk_full(e))
    # our atomic writes name the file they replace, not their temporary
    with pytest.raises(OSError) as e, atomic.replacing(tmp_path / "run.json"):
        raise OSError(errno.ENOSPC, ENOSPC)
    assert e.value.filename == str(tmp_path / "run.json")
    # nothing names a file: the workdir
    assert f"writing {tmp_path} (" in str(errors.disk_full(OSError(errno.ENOSPC, ENOSPC),
                                                           tmp_path))


@pytest.fixture
def keep_hooks(monkeypatch):
    """main leaves its console hooks installed after a full disk (the process is exiting)."""
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    for handler in logging.getLogger().handlers:
        monkeypatch.setattr(handler, "filters", list(handler.filters))


@pytest.mark.parametrize("then_raises", [True, False])
def test_a_writer_thread_failing_first_gives_the_line(tmp_path, monkeypatch, capsys, keep_hooks,
                                                      then_raises):
    """orbax writes in its own threads: their disk-full reports stay off the console, and the
    run ends in their line, whether the main thread then meets another error or none."""
    path = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp" / "_CHECKPOINT_METADATA"

    def writer():
        logging.getLogger("absl").error("write failed", exc_info=OSError(
            errno.ENOSPC, ENOSPC, str(path)))
        raise OSError(errno.ENOSPC, ENOSPC, str(path))

    def run(argv):
        thread = threading.Thread(target=writer)
        thread.start()
        thread.join()
        if then_raises:
            raise RuntimeError("Event loop is closed")

    monkeypatch.setattr(main, "main", run)
    with pytest.raises(SystemExit) as e:
        main.user_errors_in_one_line(["prog"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no space left on device writing {path} (") and \
        err.count("\n") == 1, err


def test_other_errors_keep_their_traceback_and_the_hooks(monkeypatch):
    hooks = threading.excepthook, sys.unraisablehook

    def bug(argv):
        raise ValueError("an internal error")

    monkeypatch.setattr(main, "main", bug)
    with pytest.raises(ValueError, match="an internal error"):
        main.user_errors_in_one_line(["prog"])
    assert (threading.excepthook, sys.unraisablehook) == hooks
