"""Rebuild a run from its config and workdir: the one home that every mode shares.

Training, evaluation, export, prediction and the benches all start from the same module
structure: the pretrained detector named by `model.init_from`, the layer mask, the
decomposition and the (trainable, frozen) split by Variable type. A workdir with checkpoints
is rebuilt from the checkpoint's own record (the mask it trained under, its decomposition spec
and the tail's singular triplets, checkpoints.RunRecord), with no SVD and whatever the JSON
files beside it now say; a new run estimates the mask (or reads the one `--mode mask` wrote)
and decomposes by SVD. Evaluation-type modes then restore the trained leaves.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx

from fmsd_jax import atomic, parallel
from fmsd_jax.errors import BadInput, InputNotFound
from fmsd_jax.method import decompose as decomp
from fmsd_jax.run import checkpoints, factory, layer_selection, workdir_files

log = logging.getLogger("fmsd_jax")


@dataclasses.dataclass
class Run:
    """Everything a loop needs about the assembled model, shared with evaluation."""

    graphdef: Any
    trainable: Any
    frozen: Any
    mask: np.ndarray
    spec: decomp.DecompositionSpec | None
    mesh: Any
    abstract: bool = False  # leaves are ShapeDtypeStructs with shardings (planning only)
    # What every checkpoint of the run saves beside its leaves, on the host (None: abstract).
    record: checkpoints.RunRecord | None = None


def open_run(cfg: mlc.ConfigDict, workdir: Path | None, mesh, *, estimate: bool = True,
             abstract: bool = False) -> Run:
    """Pretrained detector → layer mask (estimated once, then read back) → decomposition.

    `estimate=True` is training: a missing mask is estimated and decomposition.json written;
    the modes that only read a trained workdir pass False and write nothing here. Where the
    checkpoint that training resumes from (or that evaluation restores) holds its record, the
    run is rebuilt from that record instead (`_from_record`); a checkpoint from before records
    is rebuilt as it was then, from layer_mask.json and a new SVD, and a log line says so.

    `abstract=True` builds the same structure as sharded ShapeDtypeStructs on `mesh`, which
    may hold devices this host cannot address (a TPU topology compiled for from a CPU): no
    weights file, no data, no device transfer. The mask is then all-ones, unless the workdir
    holds one: its values are data of the compiled step, never structure (DESIGN.md §3).
    """
    if abstract:
        detector, spec = factory.abstract_detector(cfg)
        mask = _saved_mask(workdir) if workdir else None
        if mask is None:
            mask = factory.full_mask(cfg, detector)
        return _split_and_place(cfg, detector, mask, spec, mesh, abstract=True)

    saved = _checkpoint_record(cfg, workdir, for_eval=not estimate)
    if saved is not None:
        return _from_record(cfg, workdir, mesh, *saved, write_spec=estimate)

    detector = factory.build_detector(cfg)
    mask_needed = cfg.method.regime == "fmsd" and cfg.method.mask.enabled
    mask = _saved_mask(workdir) if mask_needed else factory.full_mask(cfg, detector)
    if mask is None:
        if not estimate:
            raise InputNotFound(
                f"{workdir / workdir_files.MASK_JSON} is missing: this workdir was never "
                "trained; run --mode train or --mode mask first")
        mask = layer_selection.estimate_mask(cfg, detector, workdir, mesh)

    spec = None
    if factory.uses_decomposition(cfg):
        spec = factory.decompose_detector(cfg, detector)
        if estimate and jax.process_index() == 0:  # training; the other modes only read
            atomic.write_json(workdir / workdir_files.SPEC_JSON, spec.to_dict())
    return _split_and_place(cfg, detector, mask, spec, mesh, abstract=False)


def _saved_mask(workdir: Path) -> np.ndarray | None:
    """The layer mask a run of this workdir estimated, or None before the first estimate."""
    path = workdir / workdir_files.MASK_JSON
    return np.asarray(atomic.read_json(path)["mask"], np.float32) if path.exists() else None


def _split_and_place(cfg, detector, mask, spec, mesh, *, abstract: bool) -> Run:
    """(trainable, frozen) by Variable type, each leaf placed with parallel.param_sharding.

    The record is taken to the host before placement: the placed frozen arrays of a mesh
    over several processes are not ones orbax can save (their shards read back malformed)."""
    record = None
    if not abstract:
        reference = (jax.tree.map(np.asarray, decomp.spectral_reference(detector, spec.targets))
                     if spec is not None else None)
        record = checkpoints.RunRecord(np.asarray(mask, np.float32),
                                       spec.to_dict() if spec is not None else None, reference)
    graphdef, trainable, frozen = nnx.split(
        detector, decomp.trainable_filter(cfg.method.regime), ...)
    place = parallel.abstract_tree if abstract else parallel.shard_tree
    return Run(graphdef, place(mesh, trainable), place(mesh, frozen), mask, spec, mesh,
               abstract=abstract, record=record)


def _checkpoint_record(cfg: mlc.ConfigDict, workdir: Path | None, *, for_eval: bool
                       ) -> tuple[str, checkpoints.RunRecord] | None:
    """(which checkpoint, its record) to rebuild the run from; None where there is no
    checkpoint (a new run; evaluation then fails as it always did) or it holds no record."""
    if workdir is None or not any(checkpoints.saved_steps(workdir).values()):
        return None
    ckpts = checkpoints.RunCheckpoints(workdir, select_metric=cfg.eval.select_metric)
    try:
        found = ckpts.read_record(for_eval=for_eval)
    finally:
        ckpts.close()
    if found is None:
        return None
    which, step, record = found
    folder = workdir_files.BEST_DIR if which == "best" else workdir_files.CHECKPOINTS_DIR
    where = str(Path(workdir) / folder / str(step))
    if record is None:
        log.warning("checkpoint %s predates checkpoints that hold their layer mask and "
                    "decomposition: rebuilding it as before, from %s and an SVD of the "
                    "pretrained weights", where, workdir_files.MASK_JSON)
        return None
    return where, record


def _from_record(cfg: mlc.ConfigDict, workdir: Path, mesh, where: str,
                 record: checkpoints.RunRecord, *, write_spec: bool) -> Run:
    """The run a checkpoint was trained as: the pretrained detector of `model.init_from`, the
    checkpoint's mask, and its decomposition rebuilt from the saved tail (no SVD)."""
    detector = factory.build_detector(cfg)
    fix = f"use the run's own config ({workdir / workdir_files.CONFIG_JSON})"
    want_mask = (detector.backbone.cfg.layers, len(cfg.method.targets))
    if record.mask.shape != want_mask:
        raise BadInput(f"checkpoint {where} was trained with a {record.mask.shape} layer mask, "
                       f"the config builds {want_mask} (layers, method.targets); {fix}")
    spec = None
    if factory.uses_decomposition(cfg) != (record.spec is not None):
        held, regime = ("no", "decomposes") if record.spec is None else ("a", "uses none")
        raise BadInput(f"checkpoint {where} holds {held} decomposition, but "
                       f"config.method.regime={cfg.method.regime!r} {regime}; {fix}")
    if record.spec is not None:
        spec = decomp.DecompositionSpec.from_dict(record.spec)
        asked = (tuple(cfg.method.targets), cfg.method.num_subspaces, cfg.method.rank)
        if asked != (spec.targets, spec.num_subspaces, spec.rank):
            raise BadInput(
                f"checkpoint {where} was decomposed with targets={list(spec.targets)}, "
                f"num_subspaces={spec.num_subspaces}, rank={spec.rank}; the config asks for "
                f"targets={list(asked[0])}, num_subspaces={asked[1]}, rank={asked[2]}; {fix}")
        try:
            decomp.decompose_from_reference(detector, spec, record.reference)
        except ValueError as e:
            raise BadInput(f"config.model.init_from={cfg.model.init_from!r} does not fit "
                           f"checkpoint {where} ({e}); point it at the weights the run "
                           "trained from") from e
        if write_spec and jax.process_index() == 0:  # training: the people's copy
            atomic.write_json(workdir / workdir_files.SPEC_JSON, spec.to_dict())
    _warn_if_mask_file_differs(cfg, workdir, record.mask, where)
    return _split_and_place(cfg, detector, record.mask, spec, mesh, abstract=False)


def _warn_if_mask_file_differs(cfg: mlc.ConfigDict, workdir: Path, mask: np.ndarray,
                               where: str) -> None:
    """layer_mask.json is the people's record of the mask; say so when it no longer shows the
    one the checkpoint trained under (edited, or written by an older `--mode mask`)."""
    if not (cfg.method.regime == "fmsd" and cfg.method.mask.enabled):
        return
    try:
        saved = _saved_mask(workdir)
    except BadInput:  # damaged: the checkpoint does not need it
        saved = np.zeros((0,), np.float32)
    if saved is not None and not (saved.shape == mask.shape and np.array_equal(saved, mask)):
        log.warning("%s does not show the layer mask checkpoint %s was trained under; using "
                    "the checkpoint's", workdir / workdir_files.MASK_JSON, where)


def restore_trainable(cfg: mlc.ConfigDict, workdir: Path, run,
                      purpose: str = "evaluating") -> Any:
    """The trained leaves from WORKDIR's best (else latest) checkpoint, on the run's mesh;
    `purpose` ('evaluating', 'exporting', 'scoring inputs with') goes into the log line."""
    return restore_for_eval(cfg, workdir, run, purpose)[0]


def restore_for_eval(cfg: mlc.ConfigDict, workdir: Path, run,
                     purpose: str = "evaluating") -> tuple[Any, int, str]:
    """(trained leaves, step, 'best' | 'latest') of the checkpoint that evaluation uses.

    Only the trainable leaves are read (a best checkpoint holds nothing else; from a training
    checkpoint the optimizer state is left on disk), into the run's own shardings."""
    abstract = parallel.abstract_tree(run.mesh, run.trainable)
    ckpts = checkpoints.RunCheckpoints(workdir, select_metric=cfg.eval.select_metric)
    try:
        step, trainable, which = ckpts.restore_for_eval(abstract, expect=run.record)
    finally:
        ckpts.close()
    log.info("%s the %s checkpoint (step %d) of %s", purpose, which, step, workdir)
    return trainable, int(step), which
