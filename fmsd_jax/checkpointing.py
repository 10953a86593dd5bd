"""Orbax checkpoints of a run, plus the JSON sidecars that make a workdir self-describing.

`WORKDIR/checkpoints` holds the latest steps for resuming (step, trainable state, optimizer
state, data-iterator state); `WORKDIR/best` holds the checkpoint chosen on the validation
split. Orbax writes into a temporary directory and renames it, so a checkpoint is never half
written; a SIGKILL at any moment leaves the previous one intact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import orbax.checkpoint as ocp

from fmsd_jax import atomic
from fmsd_jax.errors import AlreadyExists, BadInput, InputNotFound

log = logging.getLogger("fmsd_jax")

CONFIG_JSON = "config.json"
MASK_JSON = "layer_mask.json"
SPEC_JSON = "decomposition.json"


def jsonable_config(cfg: Any) -> Any:
    """A ConfigDict as config.json holds it (tuples as lists), for comparing the two."""
    return json.loads(json.dumps(atomic.jsonable(cfg.to_dict()), sort_keys=True))


def flat_keys(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'train.lr': 1e-3, ...} of a nested mapping."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat_keys(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(workdir: str | os.PathLike, cfg: Any) -> list[str] | None:
    """Dotted keys in which WORKDIR's config.json and `cfg` differ; None without the file."""
    path = Path(workdir) / CONFIG_JSON
    if not path.exists():
        return None
    found, want = flat_keys(atomic.read_json(path)), flat_keys(jsonable_config(cfg))
    return sorted(k for k in found.keys() | want.keys() if found.get(k) != want.get(k))


# What a resumed run may change: how long it runs, how often it reports, where it reads and
# evaluates, how it is laid out on devices, and the fault-injection knobs of the tests.
# Anything else (model, method, optimizer, training data, seed) would continue one
# experiment's state under another's settings.
RESUME_MAY_CHANGE = ("train.total_steps", "train.num_epochs", "train.log_every",
                     "train.eval_every", "train.checkpoint_every", "train.max_to_keep",
                     "train.fault_",
                     "data.workers", "data.read_threads", "data.dataset_root",
                     "data.dataset_json_folder", "data.test_dataset", "eval.", "mesh.",
                     "multihost", "distributed.")


def check_resumable(workdir: str | os.PathLike, cfg: Any) -> None:
    """Refuse, before any work, to resume WORKDIR's checkpoints under another experiment's
    config, or checkpoints whose config.json is gone (e.g. a directory deleted while its
    run was still saving): either would silently continue a different experiment."""
    workdir = Path(workdir)
    if latest_saved_step(workdir) is None:
        return
    diff = config_differences(workdir, cfg)
    if diff is None:
        raise AlreadyExists(
            f"{workdir} holds checkpoints but no {CONFIG_JSON}, so what they trained is "
            "unknown; delete the directory or use another --workdir")
    blocking = [k for k in diff if not k.startswith(RESUME_MAY_CHANGE)]
    if blocking:
        raise AlreadyExists(
            f"{workdir} holds a run trained with a different config (differs in "
            f"{blocking[:8]}{' ...' if len(blocking) > 8 else ''}); rerun with its config "
            f"({workdir / CONFIG_JSON}) to resume, or use another --workdir")


def latest_saved_step(workdir: str | os.PathLike) -> int | None:
    """The latest finalized training checkpoint in WORKDIR, read without a CheckpointManager
    (which would create directories) and ignoring orbax's unfinished temporary ones."""
    steps = ocp.step.checkpoint_steps(Path(workdir) / "checkpoints")
    return max(steps, default=None)


_READ_ATTEMPTS = 3  # a checkpoint replaced while it was read is read again, this many times


@contextlib.contextmanager
def _damaged_is_named(step_dir: Any) -> Iterator[None]:
    """A finalized checkpoint whose files are gone or altered (partly deleted, copied without
    some files) fails inside orbax with a KeyError or ValueError about items and arrays; say
    which folder and what to do instead."""
    try:
        yield
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise BadInput(f"checkpoint {step_dir} cannot be restored ({type(e).__name__}: "
                       f"{str(e)[:200]}); it is damaged or incomplete: restore it from a copy, "
                       "or delete that step folder to fall back to an earlier one") from e


class RunCheckpoints:
    """The latest-step manager (resume) and the best-on-validation manager (evaluation)."""

    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 2,
                 select_metric: str = "frame_auc"):
        workdir = Path(workdir).absolute()
        self.latest = ocp.CheckpointManager(
            workdir / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "data"),
        )
        self.best = ocp.CheckpointManager(
            workdir / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, best_fn=lambda m: m[select_metric],
                best_mode="max"),
            item_names=("state",),
        )

    def save(self, step: int, state: Any, data_iter: Any | None, *, force: bool = False) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self.latest.save(step, args=ocp.args.Composite(**items), force=force)
        atomic.note_written(self.latest.directory / str(step), False)

    def save_best(self, step: int, state: Any, metrics: dict[str, float]) -> None:
        self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                       metrics={k: float(v) for k, v in metrics.items()}, force=True)
        atomic.note_written(self.best.directory / str(step), False)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def best_saved_step(self) -> int | None:
        """The step of the kept best-on-validation checkpoint."""
        return self.best.latest_step()

    def restore_latest(self, abstract_state: Any, data_iter: Any | None) -> Any:
        step = self.latest.latest_step()
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        with _damaged_is_named(self.latest.directory / str(step)):
            restored = self.latest.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_for_eval(self, abstract_state: Any) -> tuple[int, Any, str]:
        """The best-on-validation checkpoint if one exists, else the latest one."""
        for name, mngr in (("best", self.best), ("latest", self.latest)):
            def current(mngr=mngr, name=name) -> int | None:
                return mngr.best_step() if name == "best" else mngr.latest_step()

            step = current()
            for attempt in range(_READ_ATTEMPTS):
                if step is None:
                    break
                try:
                    with _damaged_is_named(mngr.directory / str(step)):
                        restored = mngr.restore(step, args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(abstract_state)))
                    return step, restored["state"], name
                except BadInput:
                    # A training run beside this one (predict and export take no lock) may
                    # have saved a newer checkpoint and deleted this one as it was read.
                    mngr.reload()
                    newer = current()
                    if newer == step or attempt == _READ_ATTEMPTS - 1:
                        raise
                    log.info("the %s checkpoint changed from step %d to %s while it was read "
                             "(a run is training in this workdir); reading that one", name,
                             step, newer)
                    step = newer
        raise InputNotFound(
            "no checkpoint found under WORKDIR/best or WORKDIR/checkpoints; train first "
            "(python -m fmsd_jax.main --mode train ...)")

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()
