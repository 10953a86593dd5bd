"""One run per workdir (fmsd_jax/run/workdir_lock.py): a second holder is refused at once with
a line
naming the first, the lock dies with its process, and one run's processes lock files of their
own. The same through the CLI: tests/test_train.py (the SIGKILL and two-process tests)."""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fmsd_jax import errors
from fmsd_jax.demo import recipe
from fmsd_jax.run import workdir_lock

ROOT = Path(__file__).resolve().parents[1]

REFUSAL = (r"(?P<workdir>\S+) is in use by pid (?P<pid>\d+) on (?P<host>\S+) \(mode (?P<mode>\w+), "
           r"started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+\): wait for it or use another --workdir")


def test_a_second_holder_is_refused_at_once_naming_the_first(tmp_path):
    workdir = tmp_path / "new" / "run"  # made, as training would make it
    with workdir_lock.exclusive(workdir, "train") as path:
        assert path == workdir / ".lock"
        holder = workdir_lock.read_holder(path)
        assert (holder["pid"], holder["host"], holder["mode"]) == (os.getpid(),
                                                                   socket.gethostname(), "train")
        # flock belongs to an open file, so a second open in this process meets the first.
        with pytest.raises(errors.WorkdirInUse) as e, workdir_lock.exclusive(workdir, "evaluate"):
            pass
    found = re.fullmatch(REFUSAL, str(e.value))
    assert found, str(e.value)
    assert found.groupdict() == {"workdir": str(workdir), "pid": str(os.getpid()),
                                 "host": socket.gethostname(), "mode": "train"}
    assert isinstance(e.value, errors.UserError)  # main: one line, exit 2
    with workdir_lock.exclusive(workdir, "evaluate"):  # released with the block
        pass


HOLD = """
import sys, time
from fmsd_jax.run import workdir_lock
with workdir_lock.exclusive(sys.argv[1], "train"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_kill_9_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(errors.WorkdirInUse, match=f"pid {holder.pid} "), \
                workdir_lock.exclusive(tmp_path, "train"):
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
        holder.communicate()
    with workdir_lock.exclusive(tmp_path, "train") as path:
        assert workdir_lock.read_holder(path)["pid"] == os.getpid()


def test_the_processes_of_one_run_lock_files_of_their_own(tmp_path):
    with workdir_lock.exclusive(tmp_path, "train", process_index=0) as p0, \
            workdir_lock.exclusive(tmp_path, "train", process_index=1) as p1:
        assert (p0.name, p1.name) == (".lock", ".lock.p1")
        with pytest.raises(errors.WorkdirInUse, match="process 1 of a multi-host run"), \
                workdir_lock.exclusive(tmp_path, "train", process_index=1):
            pass


def test_a_mode_that_reads_a_run_does_not_create_its_workdir(tmp_path):
    with workdir_lock.exclusive(tmp_path / "typo", "evaluate", create=False) as path:
        assert path is None
    assert not (tmp_path / "typo").exists()


def test_a_workdir_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(errors.BadInput, match="--workdir .*file/run: cannot create or write it"), \
            workdir_lock.exclusive(tmp_path / "file" / "run", "train"):
        pass


def test_a_holder_that_has_not_written_yet_is_still_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "_HOLDER_WRITE_WAIT_S", 0.0)
    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # locked, nothing written yet
        with pytest.raises(errors.WorkdirInUse, match="another process .*has not written"), \
                workdir_lock.exclusive(tmp_path, "train"):
            pass
    finally:
        os.close(fd)


def test_a_filesystem_without_locks_warns_and_runs(tmp_path, monkeypatch, caplog):
    def unsupported(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", unsupported)
    with workdir_lock.exclusive(tmp_path, "train") as path:
        assert path is None
    assert "does not support locks" in caplog.text


def test_the_demo_locks_every_row_before_any_work(tmp_path):
    """A row can be trained by its own command (`configs/demo.py:method=X --workdir ROOT/X`)
    while the whole demo runs on ROOT: the demo holds each row's lock too."""
    spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("quick")
    root = tmp_path / "demo"
    with workdir_lock.exclusive(root / "effort", "train"), \
            pytest.raises(errors.WorkdirInUse, match=f"{root / 'effort'} is in use"):
        recipe.run(cfg, root)
    assert not (root / "data").exists()  # refused before the benchmark was written


def test_a_best_checkpoint_replaced_while_it_is_read_is_read_again(tmp_path):
    """predict and export take no lock, so a run training beside them may save a new best and
    delete the one they are reading; they then read the new one instead of failing."""
    import numpy as np

    from fmsd_jax.run import checkpoints

    def state(v: float) -> dict:
        return {"x": np.full((3,), v, np.float32)}

    trainer = checkpoints.RunCheckpoints(tmp_path)
    trainer.save_best(1, state(1.0), {"frame_auc": 0.5})
    trainer.wait()
    reader = checkpoints.RunCheckpoints(tmp_path)
    real_restore = reader.best.restore
    calls = []

    def restore_as_training_replaces_it(step, args):
        calls.append(step)
        if len(calls) == 1:  # the trainer saves a better step and drops step 1 meanwhile
            trainer.save_best(2, state(2.0), {"frame_auc": 0.9})
            trainer.wait()
            assert not (tmp_path / "best" / "1").exists()
        return real_restore(step, args=args)

    reader.best.restore = restore_as_training_replaces_it
    step, got, which = reader.restore_for_eval(state(0.0))
    assert (step, which, calls) == (2, "best", [1, 2])
    np.testing.assert_array_equal(got["x"], np.full((3,), 2.0, np.float32))
    trainer.close()
    reader.close()
