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

from fmsd_jax import assemble, checkpointing, layer_mask, sharding
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



def prepare(cfg: mlc.ConfigDict, workdir: Path, mesh, *, estimate: bool = True) -> Run:
    """Pretrained detector → layer mask (estimated once, then read back) → decomposition."""
    detector = assemble.build_detector(cfg)
    mask_path = workdir / checkpointing.MASK_JSON
    mask_needed = cfg.method.regime == "fmsd" and cfg.method.mask.enabled
    if mask_needed and mask_path.exists():
        mask = np.asarray(checkpointing.read_json(mask_path)["mask"], np.float32)
    elif mask_needed:
        if not estimate:
            raise InputNotFound(
                f"{mask_path} is missing: this workdir was never trained; run --mode train "
                "or --mode mask first")
        mask = layer_mask.estimate_mask(cfg, detector, workdir, mesh)
    else:
        mask = assemble.full_mask(cfg, detector)

    spec = None
    if assemble.uses_decomposition(cfg):
        spec = assemble.decompose_detector(cfg, detector)
        if jax.process_index() == 0:
            checkpointing.write_json_atomic(workdir / checkpointing.SPEC_JSON, spec.to_dict())

    graphdef, trainable, frozen = nnx.split(
        detector, decomp.trainable_filter(cfg.method.regime), ...)
    trainable = sharding.shard_tree(mesh, trainable)
    frozen = sharding.shard_tree(mesh, frozen)
    return Run(graphdef, trainable, frozen, mask, spec, mesh)


def restore_trainable(cfg: mlc.ConfigDict, workdir: Path, run,
                      purpose: str = "evaluating") -> Any:
    """The trained leaves from WORKDIR's best (else latest) checkpoint, on the run's mesh;
    `purpose` ('evaluating', 'exporting', 'scoring inputs with') goes into the log line."""
    tx = make_optimizer(cfg.optim, trainable_state=run.trainable, layer_mask=run.mask,
                        spec=run.spec, total_steps=1)
    state = {"step": np.zeros((), np.int32), "trainable": run.trainable,
             "opt_state": jax.eval_shape(tx.init, run.trainable)}
    abstract = sharding.abstract_tree(run.mesh, state)
    ckpts = checkpointing.RunCheckpoints(workdir, select_metric=cfg.eval.select_metric)
    try:
        step, restored, which = ckpts.restore_for_eval(abstract)
    finally:
        ckpts.close()
    log.info("%s the %s checkpoint (step %d) of %s", purpose, which, step, workdir)
    return restored["trainable"]
