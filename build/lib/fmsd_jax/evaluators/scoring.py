"""Score a dataset with the jitted predict function, on any mesh and any number of
processes: validation during training and the test sets of `--mode evaluate`.

The predict function is built once per run (`make_predict_fn`) and passed in, so that every
validation and every test set runs the same compiled program."""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx

from fmsd_jax import parallel
from fmsd_jax.data import pipeline
from fmsd_jax.evaluators import metrics
from fmsd_jax.parallel import on_mesh

log = logging.getLogger("fmsd_jax")


@functools.lru_cache(maxsize=8)
def make_predict_fn(graphdef: Any, mesh) -> Any:
    """jit(images -> {"prob": P(fake) = softmax(logits / T)[:, 1], "logit": l1 - l0}) with the
    batch split over the mesh; one jitted function per (run's graphdef, mesh), so every
    validation of a run, its final evaluation and the diagnostics reuse one compiled program
    (a new jit each call retraced and recompiled).

    `temperature` is an argument (a float32 scalar), not a constant, so the calibrated and the
    raw pass share the program; dividing by T = 1.0 is exact, so T = 1 gives the uncalibrated
    softmax bit for bit. "logit" is the fake margin of the *uncalibrated* logits: what the
    temperature is fitted on (evaluators/calibration.py) and what the subspace ablation and
    the mean-logit video aggregation read."""

    def predict(trainable, frozen, images, temperature):
        model = nnx.merge(graphdef, trainable, frozen)
        logits = model(images).astype(np.float32)
        return {"prob": jax.nn.softmax(logits / temperature, axis=-1)[:, 1],
                "logit": logits[:, 1] - logits[:, 0]}

    return jax.jit(on_mesh(predict, mesh), out_shardings=parallel.batch_sharding(mesh))


def temperature_arg(temperature: float = 1.0) -> np.ndarray:
    """The predict function's temperature argument (always float32, so no retrace)."""
    return np.asarray(temperature, np.float32)


def score_dataset(cfg: mlc.ConfigDict, run, trainable, name: str, split: str,
                  predict=None, reader_wrapper=None, temperature: float = 1.0
                  ) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics plus the (probability at `temperature`, label) arrays of the valid frames."""
    acc = score_split(cfg, run, trainable, name, split, predict, reader_wrapper, temperature)
    probs, labels = acc.arrays()
    return acc.result(), probs, labels


def score_split(cfg: mlc.ConfigDict, run, trainable, name: str, split: str,
                predict=None, reader_wrapper=None, temperature: float = 1.0
                ) -> metrics.MetricAccumulator:
    """Every valid frame's (probability at `temperature`, label, video id, fake margin) of
    one split of one dataset.

    `reader_wrapper` goes to `pipeline.make_eval_loader` (the robustness mode perturbs there).

    Each process scores its own shard of the set; on several hosts the kept frames of every
    process are gathered first, so every process holds the whole set.
    """
    predict = predict or make_predict_fn(run.graphdef, run.mesh)
    acc = metrics.MetricAccumulator(name=name)
    loader = pipeline.make_eval_loader(
        cfg.data, name, split=split, batch_size=cfg.eval.batch_size,
        shard_index=jax.process_index(), shard_count=jax.process_count(),
        reader_wrapper=reader_wrapper)
    t = temperature_arg(temperature)
    for batch in loader:
        images = parallel.global_batch(run.mesh, batch, ("image",))["image"]
        out = predict(trainable, run.frozen, images, t)
        local = {k: np.asarray(v) if jax.process_count() == 1 else _process_local(v)
                 for k, v in out.items()}
        acc.add(local["prob"], batch["label"], batch["video_id"], batch["valid"],
                logits=local["logit"])
    if jax.process_count() > 1:
        acc = _gather_accumulator(acc, name)
    return acc


def _process_local(global_array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in order."""
    shards = sorted(global_array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def _gather_accumulator(acc: metrics.MetricAccumulator, name: str) -> metrics.MetricAccumulator:
    """All processes' frames in one accumulator (video ids travel as SHA-1 digests)."""
    from jax.experimental import multihost_utils

    probs, labels = acc.arrays()
    margins = acc.logits()
    digests = np.stack([np.frombuffer(hashlib.sha1(str(v).encode()).digest(), np.uint8)
                        for v in acc.video_ids()]) if len(probs) else np.zeros((0, 20), np.uint8)
    # Shards may keep different frame counts: pad to the largest and gather a validity mask.
    n = int(np.max(multihost_utils.process_allgather(np.asarray([len(probs)]))))
    pad = n - len(probs)
    fields = [np.pad(probs.astype(np.float32), (0, pad)), np.pad(labels.astype(np.int32), (0, pad)),
              np.pad(digests, ((0, pad), (0, 0))), np.arange(n) < len(probs),
              np.pad(margins.astype(np.float32), (0, pad))]
    gathered = [np.asarray(multihost_utils.process_allgather(f)) for f in fields]
    p, y, d, valid, z = (g.reshape(-1, *g.shape[2:]) for g in gathered)
    out = metrics.MetricAccumulator(name=name)
    out.add(p, y, np.asarray([x.tobytes().hex() for x in d], dtype=object), valid, logits=z)
    return out


def validate(cfg: mlc.ConfigDict, run, trainable) -> dict[str, float] | None:
    """Metrics on the validation split of the training datasets (checkpoint selection)."""
    split = cfg.eval.splits_from_train
    pooled_probs, pooled_labels, results = [], [], []
    for name in cfg.data.train_dataset:
        if not pipeline.has_split(cfg.data, name, split):
            log.warning("dataset %s has no %r split: no validation for it", name, split)
            continue
        result, probs, labels = score_dataset(cfg, run, trainable, name, split)
        results.append(result)
        pooled_probs.append(probs)
        pooled_labels.append(labels)
    if not results:
        return None
    if len(results) == 1:
        out = results[0]
    else:
        out = metrics.compute_metrics(np.concatenate(pooled_probs),
                                      np.concatenate(pooled_labels))
    out = {k: float(v) for k, v in out.items() if isinstance(v, float | int | np.floating)}
    log.info("validation: %s", " ".join(f"{k} {v:.4f}" for k, v in out.items()))
    return out
