"""Command line: `python -m fmsd_jax.main --config configs/clip_b16.py --workdir DIR [--mode M]`.

Modes: train (default: estimate the layer mask, decompose, train, evaluate), mask (estimate and
save the layer mask only), evaluate (from the workdir's checkpoint), robustness (every test set
clean and under each perturbation level of config.robustness), export (merged dense CLIP
weights + head for PyTorch), predict (score image files, folders or videos given as arguments;
prints the calibrated P(fake) per input and the label at config.predict.operating_point, chosen
on validation), plan (compile the run's steps for a TPU slice given by --topology, from any
machine; prints per-chip memory, FLOPs and collectives and writes WORKDIR/plan.json), serve
(the run behind an HTTP API and a web page on config.serve.host:port, until stopped; writes
nothing).

Config: `--config FILE.py` or `--config FILE.py:ARGS`, where ARGS picks a variant the file
defines, e.g. `configs/clip_b16.py:runlocal`, `configs/clip_b16.py:bf16,runlocal`,
`configs/demo.py:method=effort` (each file's docstring lists its variants). Any field is
overridden with `--config.a.b=value`, e.g. `--config.train.batch_size=64
--config.data.test_dataset="('Celeb-DF-v2','DFDC')"`; every field and its default is in
fmsd_jax/config_base.py, and an unknown field is an error.

One run per workdir: train, mask, evaluate and robustness lock WORKDIR (fmsd_jax/run/workdir_lock.py
says why these) before reading any data, and a second such command on it exits 2 at once,
naming the first's pid, host, mode and start time; predict, export and plan only read the run
and may run beside it. The lock dies with its process, so a killed run leaves none behind.

Exit status: 0 done; 2 a mistake in the input (path, config, argument, data), a workdir in use,
or a full disk or quota (the line names the file being written and the space left; free space,
or copy the workdir elsewhere, and rerun the same command: training resumes from its last
finalized checkpoint), printed on one line with the fix; 1 an internal error, printed with its
traceback.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from fmsd_jax import atomic, errors, platforms  # none starts jax (jax.distributed comes first)
from fmsd_jax.errors import UserError
from fmsd_jax.pathnames import require_utf8, shown

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/clip_b16.py or configs/clip_b16.py:runlocal",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_MODE = flags.DEFINE_enum("mode", "train",
                          ["train", "mask", "evaluate", "robustness", "export", "predict",
                           "plan", "serve"],  # the keys of MODES, below
                          "What to do.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "plan: the TPU slice, e.g. v5e-256, v4-128, "
                                "v5p-512 or v5e:16x16; the mesh is config.mesh.")
_OUT = flags.DEFINE_string("out", None, "export: output directory (default WORKDIR/export); "
                           "predict: output JSON (default WORKDIR/predictions.json).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "evaluate: replace results that another "
                               "report points at (a demo row's, shown in the demo's report.md)")
flags.mark_flags_as_required(["config", "workdir"])


def init_distributed(cfg) -> None:
    """One JAX process per host (or per GPU); the global batch is assembled from all of them."""
    import jax

    # CPU processes (tests, CPU-only clusters) need a collectives backend for cross-process
    # ops; the setting only concerns the CPU client, so GPU and TPU runs are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    d = cfg.distributed
    if d.coordinator_address:
        jax.distributed.initialize(d.coordinator_address, num_processes=d.num_processes,
                                   process_id=d.process_id)
    else:
        jax.distributed.initialize()  # auto-detects SLURM, Cloud TPU and Open MPI clusters


# Modes that write or read orbax checkpoints under WORKDIR (tensorstore takes UTF-8 paths only).
CHECKPOINT_MODES = ("train", "evaluate", "robustness", "export", "predict", "serve")


class ShownFormatter(logging.Formatter):
    """Log lines with file names as `pathnames.shown` writes them (`caf\\xe9.png`), so a name
    that is not valid UTF-8 neither breaks the line on a strict stdout nor prints as raw bytes."""

    def format(self, record: logging.LogRecord) -> str:
        return shown(super().format(record))


def main(argv: list[str]) -> None:
    from absl import logging as absl_logging

    # A print naming a file that is not valid UTF-8 must not end the run with
    # UnicodeEncodeError (a strict stdout) or write raw bytes (the C locale's surrogateescape).
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    # Our progress goes to stdout; library chatter (orbax, XLA) only from warnings up.
    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(ShownFormatter("%(asctime)s %(message)s", "%H:%M:%S"))
    ours = logging.getLogger("fmsd_jax")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    cfg = _CONFIG.value

    platforms.skip_absent_tpu()  # before anything starts jax's backends
    multihost = cfg.multihost or os.environ.get("FMSD_MULTIHOST") == "1"
    if multihost:
        init_distributed(cfg)
    # Imported only now: they import jax, which must not start before jax.distributed does.
    from fmsd_jax import config_base
    from fmsd_jax.run import preflight, workdir_lock

    with cfg.unlocked():
        config_base.apply_regime(cfg)
    preflight.check_config(cfg)
    mode, workdir = _MODE.value, _WORKDIR.value
    preflight.check_workdir(workdir)
    if mode != "predict" and len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]} (only --mode predict takes files)")
    if mode in CHECKPOINT_MODES:
        require_utf8(workdir, "--workdir", "orbax checkpoints (tensorstore)")
    if cfg.get("demo") is not None and mode != "train":
        from fmsd_jax.demo import rows

        cfg = rows.row_config(cfg, workdir)
    try:
        if mode not in workdir_lock.LOCKING_MODES:
            run_mode(cfg, mode, workdir, argv)
        else:
            import jax

            # Before any data is read or anything compiled, so a second run is refused at once.
            with workdir_lock.exclusive(workdir, mode, create=mode in ("train", "mask"),
                                        process_index=jax.process_index() if multihost else 0):
                run_mode(cfg, mode, workdir, argv)
    except BaseException:
        if atomic.written():  # what a failed mode had written by then (to resume or remove)
            _log_written(workdir)
        raise
    _log_written(workdir)


def _log_written(workdir: str) -> None:
    log = logging.getLogger("fmsd_jax")
    for line in atomic.describe_written(workdir):
        log.info(line)


def _train(cfg, workdir: str, argv: list[str]) -> None:
    from fmsd_jax.modes import train

    try:
        if cfg.get("demo") is not None:  # configs/demo.py: data, backbone, 4 rows, report
            from fmsd_jax.demo import recipe

            recipe.run(cfg, workdir)
        else:
            train.train(cfg, workdir)
    except train.Preempted as e:
        logging.getLogger("fmsd_jax").warning("%s; rerun the same command to resume", e)


def _mask(cfg, workdir: str, argv: list[str]) -> None:
    from fmsd_jax.modes import mask

    mask.mask_only(cfg, workdir)


def _evaluate(cfg, workdir: str, argv: list[str]) -> None:
    from fmsd_jax.modes import evaluate

    evaluate.evaluate(cfg, workdir, overwrite=_OVERWRITE.value)


def _robustness(cfg, workdir: str, argv: list[str]) -> None:
    from fmsd_jax.modes import robustness

    robustness.robustness(cfg, workdir)


def _export(cfg, workdir: str, argv: list[str]) -> None:
    from fmsd_jax.modes import export

    export.export(cfg, workdir, _OUT.value)


def _predict(cfg, workdir: str, argv: list[str]) -> None:
    from fmsd_jax.modes import predict

    if len(argv) < 2:
        raise app.UsageError("--mode predict needs image files, folders or videos to score")
    predict.predict(cfg, workdir, argv[1:], _OUT.value)


def _plan(cfg, workdir: str, argv: list[str]) -> None:
    from fmsd_jax.modes import plan

    plan.run_plan(cfg, workdir, _TOPOLOGY.value)


def _serve(cfg, workdir: str, argv: list[str]) -> None:
    from fmsd_jax.modes import serve

    serve.serve(cfg, workdir)


# --mode NAME runs MODES[NAME]: one function per module of fmsd_jax/modes/, each imported only
# when its mode runs (each pulls in its own stack, and jax must not start before
# jax.distributed does).
MODES: dict[str, Callable[[Any, str, list[str]], None]] = {
    "train": _train, "mask": _mask, "evaluate": _evaluate, "robustness": _robustness,
    "export": _export, "predict": _predict, "plan": _plan, "serve": _serve}


def run_mode(cfg, mode: str, workdir: str, argv: list[str]) -> None:
    MODES[mode](cfg, workdir, argv)


def user_errors_in_one_line(argv: list[str]) -> None:
    """main, with a user's mistake printed as one line (exit 2) and a bug with its traceback.

    A full disk or quota counts as the user's, wherever it struck (a JSON, a plot, TensorBoard,
    an orbax write in its own thread): the error, or the first one a library thread reported,
    becomes one line naming the file and the space left."""
    quiet = _DiskFullQuiet()

    def workdir() -> str | None:
        return _WORKDIR.value if flags.FLAGS.is_parsed() else None

    try:
        main(argv)
        if quiet.seen is not None:  # a library thread's write failed, yet nothing raised
            fail(str(errors.disk_full(quiet.seen, workdir())))
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        # Ctrl-C is the user's choice, not a bug: no traceback. Orbax renames a checkpoint
        # into place only when it is complete, so the last finalized one is intact.
        print("interrupted (Ctrl-C); finished files are kept, and a training run resumes from "
              "its last finalized checkpoint when the same command is rerun", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        cause = e if errors.disk_full_code(e) is not None else quiet.seen
        if cause is None:
            raise
        quiet.seen = cause
        fail(str(errors.disk_full(cause, workdir())))
    finally:
        quiet.release()


class _DiskFullQuiet(logging.Filter):
    """Keeps off the console what libraries print when the disk fills, so that the run ends in
    the one line main prints: orbax logs each failed write with its traceback from its own
    thread, asyncio its unretrieved tasks, tensorboardX's thread dies with one, and tensorstore
    reports the writes that complete after orbax closed their event loop as "unraisable"
    RuntimeErrors, before any of the others. The first disk-full error is kept for main's line;
    unraisable errors are held back and printed when the run ends, unless the disk filled."""

    def __init__(self):
        super().__init__()
        self.seen: BaseException | None = None
        self._held: list[str] = []
        self._handlers = list(logging.getLogger().handlers)  # absl's: library loggers reach it
        self._hooks = threading.excepthook, sys.unraisablehook
        for handler in self._handlers:
            handler.addFilter(self)
        threading.excepthook = lambda args: self._swallowed(args.exc_value) or \
            self._hooks[0](args)
        sys.unraisablehook = self._hold

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not self._swallowed(exc, record.getMessage())

    def _swallowed(self, exc: BaseException | None, text: str = "") -> bool:
        if (exc is None or errors.disk_full_code(exc) is None) and \
                errors.disk_full_code(text) is None:
            return False
        if self.seen is None:
            self.seen = exc if exc is not None else OSError(text)
        return True

    def _hold(self, args) -> None:
        if not self._swallowed(args.exc_value):
            self._held.append(f"{args.err_msg or 'Exception ignored in'}: {args.object!r}\n"
                              + "".join(traceback.format_exception(
                                  args.exc_type, args.exc_value, args.exc_traceback)))

    def release(self) -> None:
        """Print what was held back and put the hooks back, unless the disk filled (then stay
        quiet until the process exits: its threads are still failing to write)."""
        if self.seen is not None:
            return
        for handler in self._handlers:
            handler.removeFilter(self)
        threading.excepthook, sys.unraisablehook = self._hooks
        for text in self._held:
            sys.stderr.write(text)


def fail(message: str) -> None:
    """A user's mistake: one line on stderr, exit status 2; a file name in it shows its
    undecodable bytes as `\\xe9` (pathnames.shown)."""
    print(f"error: {shown(message)}", file=sys.stderr)
    sys.exit(2)


def _usage_exit() -> None:
    print(__doc__)
    print(flags.FLAGS.main_module_help())
    sys.exit(0)


def _config_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _check_config_file(value: str | None) -> None:
    """A missing config file is named in one line (ml_collections defers it to a chained
    traceback at first use)."""
    if not value:
        return
    path = Path(value.split(":", 1)[0])
    if path.is_file():
        return
    have = sorted(str(p) for p in path.parent.glob("*.py")) if path.parent.is_dir() else []
    close = difflib.get_close_matches(str(path), have, n=1)
    fail(f"--config={value}: no config file {str(path)!r}"
         + (f"; did you mean {close[0]}?" if close else "")
         + (f" ({path.parent} has {', '.join(Path(h).name for h in have)})" if have else
            " (a path relative to the current directory)"))


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, with an unknown `--config.a.b` override named instead of a KeyError,
    a config file or argument mistake in one line, and `--help` that exits 0."""
    if any(a in ("-h", "--help", "-help", "--helpshort", "-?") for a in argv[1:]):
        _usage_exit()
    _check_config_file(_config_arg(argv[1:]))
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        text = str(e).replace("\\n", "\n").replace("\\", "")
        found = re.search(r"'([A-Za-z0-9_]+)'", text)
        key = found.group(1) if found else text
        hint = re.search(r"Did you mean \S+", text)
        bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a]
        fail(f"{', '.join(bad) or key}: the config has no field {key!r}"
             f"{'; ' + hint.group(0).replace(chr(34), '') if hint else ''}. Every field is "
             "defined, with its default, in fmsd_jax/config_base.py.")
    except flags.Error as e:
        # A UserError raised inside the config file's get_config (e.g. an unknown `:arg`)
        # reaches us as a flags.Error holding its traceback text: keep only its message.
        ours = re.search(rf"^{re.escape(UserError.__module__)}\.\w+: (.*)$", str(e), re.M)
        if ours:
            fail(f"--config={_config_arg(argv[1:])}: {ours.group(1)}")
        fail(f"{str(e).rstrip('.')}. Pass --help for the usage.")


if __name__ == "__main__":
    app.run(user_errors_in_one_line, flags_parser=parse_flags)
