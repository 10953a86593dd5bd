"""Orbax checkpoints of a run, plus the JSON files that describe a workdir to people.

`WORKDIR/checkpoints/<step>` holds what resuming needs: `state` (the TrainState: step,
trainable leaves, optimizer state) and `data` (the data iterator). `WORKDIR/best/<step>` holds
the checkpoint chosen on the validation split: `trainable` only (evaluation never needs the
Adam moments). Each step of either also holds the `RunRecord` it was trained under, so that it
restores alone: `layer_mask` and `decomposition` (JSON) and `reference` (the tail's singular
triplets, from which W_s is rebuilt without an SVD). `layer_mask.json` and `decomposition.json`
beside the checkpoints are for people; restoring reads the checkpoint's own items. Orbax
writes into a temporary directory and renames it, so a checkpoint is never half written; a
SIGKILL at any moment leaves the previous one intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np
import orbax.checkpoint as ocp

from fmsd_jax import atomic
from fmsd_jax.errors import AlreadyExists, BadInput, InputNotFound, UserError
from fmsd_jax.method import decompose as decomp
from fmsd_jax.run import workdir_files

log = logging.getLogger("fmsd_jax")

# Orbax item names of a checkpoint step (see the module docstring).
STATE_ITEM, DATA_ITEM, TRAINABLE_ITEM = "state", "data", "trainable"
MASK_ITEM, SPEC_ITEM, REFERENCE_ITEM = "layer_mask", "decomposition", "reference"


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
    path = Path(workdir) / workdir_files.CONFIG_JSON
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
            f"{workdir} holds checkpoints but no {workdir_files.CONFIG_JSON}, so what they "
            "trained is unknown; delete the directory or use another --workdir")
    blocking = [k for k in diff if not k.startswith(RESUME_MAY_CHANGE)]
    if blocking:
        raise AlreadyExists(
            f"{workdir} holds a run trained with a different config (differs in "
            f"{blocking[:8]}{' ...' if len(blocking) > 8 else ''}); rerun with its config "
            f"({workdir / workdir_files.CONFIG_JSON}) to resume, or use another --workdir")


def latest_saved_step(workdir: str | os.PathLike) -> int | None:
    """The latest finalized training checkpoint in WORKDIR, read without a CheckpointManager
    (which would create directories) and ignoring orbax's unfinished temporary ones."""
    return max(saved_steps(workdir)["latest"], default=None)


_READ_ATTEMPTS = 3  # a checkpoint replaced while it was read is read again, this many times


@contextlib.contextmanager
def _damaged_is_named(step_dir: Any) -> Iterator[None]:
    """A finalized checkpoint whose files are gone or altered (partly deleted, copied without
    some files) fails inside orbax with a KeyError or ValueError about items and arrays; say
    which folder and what to do instead."""
    try:
        yield
    except UserError:  # already one line naming the checkpoint
        raise
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise BadInput(f"checkpoint {step_dir} cannot be restored ({type(e).__name__}: "
                       f"{str(e)[:200]}); it is damaged or incomplete: restore it from a copy, "
                       "or delete that step folder to fall back to an earlier one") from e


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What a checkpoint holds besides its trained leaves, so that it restores on its own.

    `mask`: the (layers, targets) layer mask the step was trained under; `spec`: the
    `DecompositionSpec` as a dict (None for regimes that decompose nothing); `reference`:
    `method.decompose.spectral_reference` of the decomposed model (None likewise). Sidecar
    files can be rewritten after training (`--mode mask`, an edit); these items cannot, so a
    restore rebuilds exactly the model the step trained.
    """

    mask: np.ndarray
    spec: dict[str, Any] | None
    reference: dict[str, dict[str, Any]] | None

    def save_args(self) -> dict[str, ocp.args.CheckpointArgs]:
        items: dict[str, ocp.args.CheckpointArgs] = {
            MASK_ITEM: ocp.args.JsonSave({"mask": np.asarray(self.mask).tolist()})}
        if self.spec is not None:
            items[SPEC_ITEM] = ocp.args.JsonSave(self.spec)
            items[REFERENCE_ITEM] = ocp.args.StandardSave(self.reference)
        return items

    def same_model(self, mask: Any, spec: dict[str, Any] | None) -> bool:
        """Whether a restore of `mask` and `spec` describes this same trained model."""
        return (np.shape(mask) == np.shape(self.mask)
                and bool(np.array_equal(np.asarray(mask, np.float32), self.mask))
                and atomic.jsonable(spec) == atomic.jsonable(self.spec))


def _has_item(mngr: ocp.CheckpointManager, step: int, item: str) -> bool:
    """Whether checkpoint `step` holds `item` (older ones lack the record items)."""
    return (mngr.directory / str(step) / item).is_dir()


def _record_json_args(mngr: ocp.CheckpointManager, step: int) -> dict[str, ocp.args.JsonRestore]:
    """Restore args of the record's JSON items that checkpoint `step` holds: none for a
    checkpoint from before records, the mask alone for a regime that decomposes nothing."""
    if not _has_item(mngr, step, MASK_ITEM):
        return {}
    items = {MASK_ITEM: ocp.args.JsonRestore()}
    if _has_item(mngr, step, SPEC_ITEM):
        items[SPEC_ITEM] = ocp.args.JsonRestore()
    return items


def _reference_target(spec: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Host arrays shaped as the reference of a model decomposed as `spec` (restore target):
    restored to the host, the reference then meets the pretrained weights on the device they
    were loaded to, as the SVD's outputs do when training starts."""
    shapes = decomp.reference_shapes(decomp.DecompositionSpec.from_dict(spec))
    return {t: {k: np.zeros(shape, np.float32) for k, shape in arrays.items()}
            for t, arrays in shapes.items()}


def saved_steps(workdir: str | os.PathLike) -> dict[str, list[int]]:
    """{'best': steps, 'latest': steps} of finalized checkpoints, read without a manager."""
    workdir = Path(workdir)
    return {"best": sorted(ocp.step.checkpoint_steps(workdir / workdir_files.BEST_DIR)),
            "latest": sorted(ocp.step.checkpoint_steps(workdir / workdir_files.CHECKPOINTS_DIR))}


class RunCheckpoints:
    """The latest-step manager (resume) and the best-on-validation manager (evaluation)."""

    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 2,
                 select_metric: str = "frame_auc", record: RunRecord | None = None):
        """`record`: what every save adds to its step (a training run passes its own)."""
        workdir = Path(workdir).absolute()
        self.record = record
        record_items = (MASK_ITEM, SPEC_ITEM, REFERENCE_ITEM)
        self.latest = ocp.CheckpointManager(
            workdir / workdir_files.CHECKPOINTS_DIR,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=(STATE_ITEM, DATA_ITEM, *record_items),
        )
        self.best = ocp.CheckpointManager(
            workdir / workdir_files.BEST_DIR,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, best_fn=lambda m: m[select_metric],
                best_mode="max"),
            # STATE_ITEM: a best checkpoint written before they held the trainable leaves only
            item_names=(TRAINABLE_ITEM, STATE_ITEM, *record_items),
        )

    def _record_args(self) -> dict[str, ocp.args.CheckpointArgs]:
        return self.record.save_args() if self.record is not None else {}

    def save(self, step: int, state: Any, data_iter: Any | None, *, force: bool = False) -> None:
        items = {STATE_ITEM: ocp.args.StandardSave(state), **self._record_args()}
        if data_iter is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iter)
        self.latest.save(step, args=ocp.args.Composite(**items), force=force)
        atomic.note_written(self.latest.directory / str(step), False)

    def save_best(self, step: int, trainable: Any, metrics: dict[str, float]) -> None:
        """The trainable leaves only (and the record): evaluation never reads the moments."""
        self.best.save(step, args=ocp.args.Composite(
            **{TRAINABLE_ITEM: ocp.args.StandardSave(trainable)}, **self._record_args()),
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

    def restore_for_eval(self, abstract_trainable: Any, *,
                         expect: RunRecord | None = None) -> tuple[int, Any, str]:
        """(step, trainable leaves, 'best' | 'latest') of the best-on-validation checkpoint if
        one exists, else of the latest one; the optimizer state is not read.

        `expect`: the record the caller rebuilt its model from; a checkpoint that holds
        another mask or decomposition (the workdir changed between the two reads) is refused.
        """
        def restore(mngr: ocp.CheckpointManager, step: int) -> Any:
            items: dict[str, ocp.args.CheckpointArgs] = {}
            if _has_item(mngr, step, TRAINABLE_ITEM):
                items[TRAINABLE_ITEM] = ocp.args.StandardRestore(abstract_trainable)
            else:  # a training step, or a best one from before: the trainable subtree only
                target = {"trainable": abstract_trainable}
                items[STATE_ITEM] = ocp.args.PyTreeRestore(
                    item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True)
            if expect is not None:
                items |= _record_json_args(mngr, step)
            restored = mngr.restore(step, args=ocp.args.Composite(**items))
            if MASK_ITEM in items and not expect.same_model(
                    restored[MASK_ITEM]["mask"], restored.get(SPEC_ITEM)):
                raise BadInput(
                    f"checkpoint {mngr.directory / str(step)} holds another layer mask or "
                    "decomposition than the one read from this workdir a moment earlier (the "
                    "workdir changed meanwhile); rerun the command")
            return (restored[TRAINABLE_ITEM] if TRAINABLE_ITEM in items
                    else restored[STATE_ITEM]["trainable"])

        return self._read_for_eval(restore)

    def read_record(self, *, for_eval: bool) -> tuple[str, int, RunRecord | None] | None:
        """('best' | 'latest', step, its RunRecord) of the checkpoint a restore would read:
        for evaluation the one `restore_for_eval` reads, for training the latest one. The
        record is None for a checkpoint written before checkpoints held one; the result is
        None when there is no checkpoint at all."""
        if for_eval:
            try:
                step, record, which = self._read_for_eval(self._record_at)
            except InputNotFound:
                return None
            return which, step, record
        step = self.latest.latest_step()
        if step is None:
            return None
        with _damaged_is_named(self.latest.directory / str(step)):
            return "latest", step, self._record_at(self.latest, step)

    @staticmethod
    def _record_at(mngr: ocp.CheckpointManager, step: int) -> RunRecord | None:
        items = _record_json_args(mngr, step)
        if not items:
            return None
        restored = mngr.restore(step, args=ocp.args.Composite(**items))
        spec = restored.get(SPEC_ITEM)
        reference = None
        if spec is not None:
            reference = mngr.restore(step, args=ocp.args.Composite(**{
                REFERENCE_ITEM: ocp.args.StandardRestore(_reference_target(spec))}))[
                REFERENCE_ITEM]
        return RunRecord(np.asarray(restored[MASK_ITEM]["mask"], np.float32), spec, reference)

    def _read_for_eval(self, read: Callable[[ocp.CheckpointManager, int], Any]
                       ) -> tuple[int, Any, str]:
        """(step, read(manager, step), which) of the best checkpoint if one exists, else the
        latest; a checkpoint replaced while it was read is read again at its new step."""
        for name, mngr in (("best", self.best), ("latest", self.latest)):
            def current(mngr=mngr, name=name) -> int | None:
                return mngr.best_step() if name == "best" else mngr.latest_step()

            step = current()
            for attempt in range(_READ_ATTEMPTS):
                if step is None:
                    break
                try:
                    with _damaged_is_named(mngr.directory / str(step)):
                        return step, read(mngr, step), name
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
