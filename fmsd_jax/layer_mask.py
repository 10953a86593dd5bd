"""Forgery-aware layer masking at the run level: data, gradient moments, the saved mask.

`fmsd_jax.method.masking` holds the estimator; this module feeds it the run's training data on
the run's mesh and writes `layer_mask.json` and `layer_scores.png` into the workdir.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import ml_collections as mlc
import numpy as np

from fmsd_jax import checkpointing, report, sharding
from fmsd_jax.data import pipeline
from fmsd_jax.method import masking
from fmsd_jax.method.objective import make_loss_fn

log = logging.getLogger("fmsd_jax")


def estimator_loss_fn():
    """The loss whose gradients score the layers: cross-entropy only (no decomposition yet)."""
    return make_loss_fn(lambda_orth=0.0, lambda_spec=0.0)


def estimate_mask(cfg: mlc.ConfigDict, detector, workdir: Path, mesh) -> np.ndarray:
    """Forgery-aware layer masking on the dense pretrained detector (DESIGN.md §1.3)."""
    loader = pipeline.make_train_loader(
        cfg.data, global_batch_size=cfg.train.batch_size, seed=cfg.seed + 1,
        shard_index=jax.process_index(), shard_count=jax.process_count())
    it = iter(loader)
    batches = (sharding.global_batch(mesh, next(it), ("image", "label"))
               for _ in range(cfg.method.mask.num_batches))
    t0 = time.perf_counter()
    graphdef, candidates, rest = masking.candidate_split(detector, tuple(cfg.method.targets))
    scores = masking.estimate_layer_scores(
        graphdef, candidates, rest, batches, loss_fn=estimator_loss_fn(),
        targets=tuple(cfg.method.targets), score=cfg.method.mask.score, eps=cfg.method.mask.eps,
        num_batches=cfg.method.mask.num_batches, mesh=mesh)
    mc = cfg.method.mask
    mask = masking.select_layers(scores["score"],
                                 top_k=mc.top_k if mc.select == "top_k" else None,
                                 threshold=mc.threshold if mc.select == "threshold" else None)
    mask = np.asarray(mask, np.float32)
    log.info("layer mask: %d of %d candidate layers selected in %.1fs", int(mask.sum()),
             mask.size, time.perf_counter() - t0)
    if jax.process_index() == 0:
        record = masking.mask_report(scores, mask, cfg.method.targets) | {"score_kind": mc.score}
        checkpointing.write_json_atomic(workdir / checkpointing.MASK_JSON, record)
        report.plot_layer_scores(record, list(cfg.method.targets), mask.astype(bool),
                                 workdir / "layer_scores.png")
    return mask
