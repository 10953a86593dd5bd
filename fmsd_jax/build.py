"""Rebuild a run from its config and workdir: the one home that every mode shares.

Training, evaluation, export, prediction and the benches all start from the same module
structure: the pretrained detector named by `model.init_from`, the layer mask (estimated once,
then read back from the workdir), the decomposition and the (trainable, frozen) split by
Variable type. Evaluation-type modes then restore the trained leaves from a checkpoint.
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

from fmsd_jax import assemble, atomic, checkpointing, layer_mask, sharding
from fmsd_jax.errors import InputNotFound
from fmsd_jax.method import decompose as decomp
from fmsd_jax.method.optimizer import make_optimizer

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


def prepare(cfg: mlc.ConfigDict, workdir: Path | None, mesh, *, estimate: bool = True,
            abstract: bool = False) -> Run:
    """Pretrained detector → layer mask (estimated once, then read back) → decomposition.

    `estimate=True` is training: a missing mask is estimated and decomposition.json written;
    the modes that only read a trained workdir pass False and write nothing here.

    `abstract=True` builds the same structure as sharded ShapeDtypeStructs on `mesh`, which
    may hold devices this host cannot address (a TPU topology compiled for from a CPU): no
    weights file, no data, no device transfer. The mask is then all-ones, unless the workdir
    holds one: its values are data of the compiled step, never structure (DESIGN.md §3).
    """
    if abstract:
        detector, spec = assemble.abstract_detector(cfg)
        mask = _saved_mask(workdir) if workdir else None
        if mask is None:
            mask = assemble.full_mask(cfg, detector)
        return _split_and_place(cfg, detector, mask, spec, mesh, abstract=True)

    detector = assemble.build_detector(cfg)
    mask_needed = cfg.method.regime == "fmsd" and cfg.method.mask.enabled
    mask = _saved_mask(workdir) if mask_needed else assemble.full_mask(cfg, detector)
    if mask is None:
        if not estimate:
            raise InputNotFound(
                f"{workdir / checkpointing.MASK_JSON} is missing: this workdir was never "
                "trained; run --mode train or --mode mask first")
        mask = layer_mask.estimate_mask(cfg, detector, workdir, mesh)

    spec = None
    if assemble.uses_decomposition(cfg):
        spec = assemble.decompose_detector(cfg, detector)
        if estimate and jax.process_index() == 0:  # training; the other modes only read
            atomic.write_json(workdir / checkpointing.SPEC_JSON, spec.to_dict())
    return _split_and_place(cfg, detector, mask, spec, mesh, abstract=False)


def _saved_mask(workdir: Path) -> np.ndarray | None:
    """The layer mask a run of this workdir estimated, or None before the first estimate."""
    path = workdir / checkpointing.MASK_JSON
    return np.asarray(atomic.read_json(path)["mask"], np.float32) if path.exists() else None


def _split_and_place(cfg, detector, mask, spec, mesh, *, abstract: bool) -> Run:
    """(trainable, frozen) by Variable type, each leaf placed with sharding.param_sharding."""
    graphdef, trainable, frozen = nnx.split(
        detector, decomp.trainable_filter(cfg.method.regime), ...)
    place = sharding.abstract_tree if abstract else sharding.shard_tree
    return Run(graphdef, place(mesh, trainable), place(mesh, frozen), mask, spec, mesh,
               abstract=abstract)


def restore_trainable(cfg: mlc.ConfigDict, workdir: Path, run,
                      purpose: str = "evaluating") -> Any:
    """The trained leaves from WORKDIR's best (else latest) checkpoint, on the run's mesh;
    `purpose` ('evaluating', 'exporting', 'scoring inputs with') goes into the log line."""
    return restore_evaluated(cfg, workdir, run, purpose)[0]


def restore_evaluated(cfg: mlc.ConfigDict, workdir: Path, run,
                      purpose: str = "evaluating") -> tuple[Any, int, str]:
    """(trained leaves, step, 'best' | 'latest') of the checkpoint that evaluation uses."""
    tx = make_optimizer(assemble.optim_section(cfg), trainable_state=run.trainable,
                        layer_mask=run.mask, spec=run.spec, total_steps=1)
    state = {"step": np.zeros((), np.int32), "trainable": run.trainable,
             "opt_state": jax.eval_shape(tx.init, run.trainable)}
    abstract = sharding.abstract_tree(run.mesh, state)
    ckpts = checkpointing.RunCheckpoints(workdir, select_metric=cfg.eval.select_metric)
    try:
        step, restored, which = ckpts.restore_for_eval(abstract)
    finally:
        ckpts.close()
    log.info("%s the %s checkpoint (step %d) of %s", purpose, which, step, workdir)
    return restored["trainable"], int(step), which
