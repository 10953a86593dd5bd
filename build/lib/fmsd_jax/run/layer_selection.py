"""Forgery-aware layer masking at the run level: a head that knows the task, the gradient
moments, the ranking's stability across seeds, and the saved mask.

`fmsd_jax.method.masking` holds the estimator; this module feeds it the run's training data on
the run's mesh and writes `layer_mask.json` into the workdir (the modes that estimate a mask
draw its chart, `layer_scores.png`, with `evaluators.plots.plot_layer_mask`).

Why a warmed head. The moments are those of the training loss's gradient w.r.t. each candidate
weight, and that gradient passes through the head: with a freshly initialised head they describe
the random head (issue 11: the score scale swung ~10x with the head seed). So the head is first
fitted as a linear probe on the frozen pretrained backbone (`method.mask.warmup_steps` Adam
steps at `method.mask.warmup_lr`, on training batches drawn with their own seed), and the T
estimation batches are scored with that head. `warmup_steps=0` gives the random-head estimate
(for comparison).

The warmed head does **not** continue into training: training starts from the same fresh head
as every baseline (Effort, full fine-tuning, linear probe get no warm-up), so a comparison
differs only in what the method adapts; the warm-up is part of choosing the mask, like the T
batches, and its cost is logged with it. (Starting FMSD from the warmed head would give it
`warmup_steps` extra head steps the baselines do not get.)

Stability. `--mode mask` repeats the estimate `method.mask.stability_seeds` times (replicate i:
head seed cfg.seed + i, estimation data seed cfg.seed + i + 1, warm-up data seed cfg.seed + i + 2;
replicate 0 is exactly what training uses) and reports the Spearman rank correlation of the
layer scores and the overlap of the selected sets between every pair. Training estimates
replicate 0 only (stability costs S times the estimate); its `layer_mask.json` says so.

`layer_mask.json` keys, besides the estimator's (targets, mask, bias, variance, gsnr, score,
num_batches, score_kind):
    head: {kind: 'warmed' | 'random', seed, warmup_steps, warmup_lr, loss_first, loss_last,
           accuracy_last, continues_into_training: false}
          loss_first / loss_last: mean CE of the first / last min(10, steps // 2) warm-up steps.
    noise_floor: 1/(T−1) ('bias_variance': the score of a gradient with no consistent direction;
                 cells near it are ranked by noise) | null ('gsnr')
    stability: null (training: not measured) | {
        seeds: [S ints], scores: [S × L × T], masks: [S × L × T bools],
        spearman: S × S, mean_spearman, min_spearman   (off-diagonal pairs)
        overlap: S × S (|A ∩ B| / |A| of the selected sets), mean_overlap}
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from flax import nnx
from scipy import stats

from fmsd_jax import atomic, parallel
from fmsd_jax.data import pipeline
from fmsd_jax.method import masking
from fmsd_jax.method.objective import CROSS_ENTROPY, make_loss_fn
from fmsd_jax.model.detector import HeadParam
from fmsd_jax.parallel import on_mesh
from fmsd_jax.run import factory, workdir_files

log = logging.getLogger("fmsd_jax")


def _batches(cfg: mlc.ConfigDict, mesh, seed: int, count: int):
    loader = pipeline.make_train_loader(
        cfg.data, global_batch_size=cfg.train.batch_size, seed=seed,
        shard_index=jax.process_index(), shard_count=jax.process_count())
    it = iter(loader)
    return (parallel.global_batch(mesh, next(it), ("image", "label")) for _ in range(count))


_CE = make_loss_fn(CROSS_ENTROPY)  # one object: jit caches stay warm


def estimator_loss_fn():
    """The loss whose gradients score the layers: cross-entropy only (no decomposition yet)."""
    return _CE


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _warmup_step(graphdef, lr: float, mesh, head, opt_state, rest, batch):
    """One Adam step of the head alone (the backbone is only run forward)."""
    tx = optax.adam(lr)

    def loss_of(h):
        return _CE(nnx.merge(graphdef, h, rest), batch)

    grad_fn = on_mesh(jax.value_and_grad(loss_of, has_aux=True), mesh)
    (_, aux), grads = grad_fn(head)
    updates, opt_state = tx.update(grads, opt_state, head)
    return optax.apply_updates(head, updates), opt_state, (aux["ce"], aux["accuracy"])


def estimator_placement(mesh, candidates: nnx.State, rest: nnx.State) -> tuple:
    """The run's shardings for the estimator: weights as the train step holds them
    (fsdp-split when large), the batch over every batch axis (fmsd_jax/parallel.py)."""
    return (parallel.tree_shardings(mesh, candidates), parallel.tree_shardings(mesh, rest),
            parallel.batch_sharding(mesh))


def warm_head(cfg: mlc.ConfigDict, detector: nnx.Module, mesh, *,
              seed: int) -> tuple[nnx.State, dict[str, Any]]:
    """(head state, record): the head fitted on the frozen backbone; `detector` is untouched."""
    mc = cfg.method.mask
    graphdef, head, rest = nnx.split(detector, HeadParam, ...)
    head = parallel.shard_tree(mesh, jax.tree.map(jnp.copy, head))
    record: dict[str, Any] = {"kind": "warmed" if mc.warmup_steps else "random", "seed": seed,
                              "warmup_steps": int(mc.warmup_steps),
                              "warmup_lr": float(mc.warmup_lr),
                              "continues_into_training": False}
    if not mc.warmup_steps:
        return head, record
    rest = parallel.shard_tree(mesh, rest)
    lr = float(mc.warmup_lr)
    opt_state = optax.adam(lr).init(head)
    t0 = time.perf_counter()
    curve = []
    for batch in _batches(cfg, mesh, seed + 2, mc.warmup_steps):
        head, opt_state, metrics = _warmup_step(graphdef, lr, mesh, head, opt_state, rest,
                                                batch)
        curve.append(metrics)
    ce, acc = (np.asarray(x, np.float64) for x in zip(*jax.device_get(curve), strict=True))
    n = max(1, min(10, len(ce) // 2))
    record |= {"loss_first": float(ce[:n].mean()), "loss_last": float(ce[-n:].mean()),
               "accuracy_last": float(acc[-n:].mean())}
    log.info("mask head warm-up (seed %d): %d steps in %.1fs, CE %.4f -> %.4f, accuracy %.3f",
             seed, mc.warmup_steps, time.perf_counter() - t0, record["loss_first"],
             record["loss_last"], record["accuracy_last"])
    return head, record


def layer_scores(cfg: mlc.ConfigDict, detector: nnx.Module, mesh, *,
                 seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(scores, head record) of one replicate: warm the head, then the T estimation batches."""
    head, head_record = warm_head(cfg, detector, mesh, seed=seed)
    graphdef, _, rest = nnx.split(detector, HeadParam, ...)
    model = nnx.merge(graphdef, head, rest)
    targets = tuple(cfg.method.targets)
    graphdef, candidates, rest = masking.candidate_split(model, targets)
    mc = cfg.method.mask
    scores = masking.estimate_layer_scores(
        graphdef, candidates, rest, _batches(cfg, mesh, seed + 1, mc.num_batches),
        loss_fn=_CE, targets=targets,
        score=mc.score, eps=mc.eps, num_batches=mc.num_batches, mesh=mesh,
        placement=estimator_placement(mesh, candidates, rest))
    return scores, head_record


def select(cfg: mlc.ConfigDict, score: np.ndarray) -> np.ndarray:
    mc = cfg.method.mask
    return masking.select_layers(score, top_k=mc.top_k if mc.select == "top_k" else None,
                                 threshold=mc.threshold if mc.select == "threshold" else None)


def noise_floor(cfg: mlc.ConfigDict, scores: dict) -> float | None:
    """What bias/variance scores when the gradient is pure noise: with zero mean, E‖ḡ‖² = Σσ²/T
    and the (1/T) variance estimate has E = Σσ²(T−1)/T, so the score is ≈ 1/(T−1).

    Cells near it carry no consistent gradient, and their order is noise (None for 'gsnr')."""
    t = float(scores["num_batches"])
    if cfg.method.mask.score != "bias_variance" or t < 2:
        return None
    return 1.0 / (t - 1.0)


def stability(seeds: list[int], scores: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    """Pairwise Spearman ρ of the score rankings and overlap of the selected sets."""
    s = len(seeds)
    rho, overlap = np.eye(s), np.eye(s)
    for i, j in itertools.combinations(range(s), 2):
        r = stats.spearmanr(scores[i].ravel(), scores[j].ravel()).statistic
        rho[i, j] = rho[j, i] = float(r)
        both = np.logical_and(masks[i], masks[j]).sum()
        overlap[i, j] = overlap[j, i] = float(both / max(masks[i].sum(), masks[j].sum(), 1))
    off = ~np.eye(s, dtype=bool)
    return {"seeds": list(seeds), "scores": [np.asarray(x).tolist() for x in scores],
            "masks": [np.asarray(m, bool).tolist() for m in masks],
            "spearman": rho.tolist(), "overlap": overlap.tolist(),
            "mean_spearman": float(rho[off].mean()) if s > 1 else None,
            "min_spearman": float(rho[off].min()) if s > 1 else None,
            "mean_overlap": float(overlap[off].mean()) if s > 1 else None}


def estimate_mask(cfg: mlc.ConfigDict, detector: nnx.Module, workdir: Path, mesh, *,
                  stability_seeds: int = 1) -> np.ndarray:
    """Forgery-aware layer masking on the dense pretrained detector (DESIGN.md §1.3).

    Replicate 0 (head seed cfg.seed) gives the mask; with `stability_seeds` > 1 the estimate is
    repeated with other head/data seeds and the ranking's stability is recorded and printed.
    """
    t0 = time.perf_counter()
    seeds = [int(cfg.seed) + i for i in range(max(1, stability_seeds))]
    results = []
    for i, seed in enumerate(seeds):
        # Other seeds' detectors take replicate 0's graphdef (a separately built module's
        # compares unequal), so the jitted warm-up and estimator steps are reused, not rebuilt.
        det = detector if i == 0 else nnx.merge(
            nnx.graphdef(detector), nnx.state(factory.build_detector(cfg, seed=seed)))
        results.append(layer_scores(cfg, det, mesh, seed=seed))
    scores, head_record = results[0]
    masks = [select(cfg, r[0]["score"]) for r in results]
    mask = np.asarray(masks[0], np.float32)
    log.info("layer mask: %d of %d candidate layers selected in %.1fs (%s head)",
             int(mask.sum()), mask.size, time.perf_counter() - t0, head_record["kind"])
    floor = noise_floor(cfg, scores)
    if floor is not None:
        above = int(np.sum(scores["score"][mask.astype(bool)] > 2 * floor))
        log.info("%d of the %d selected layers score above twice the pure-noise level "
                 "1/(T-1) = %.3g (a gradient with no consistent direction scores about that)",
                 above,
                 int(mask.sum()), floor)
    stab = None
    if len(seeds) > 1:
        stab = stability(seeds, [r[0]["score"] for r in results], masks)
        log.info("layer ranking stability over %d head/data seeds: Spearman rho mean %.3f "
                 "(min %.3f); selected sets overlap %.2f on average", len(seeds),
                 stab["mean_spearman"], stab["min_spearman"], stab["mean_overlap"])
    if jax.process_index() == 0:
        mc = cfg.method.mask
        record = masking.mask_report(scores, mask, cfg.method.targets) | {
            "score_kind": mc.score, "head": head_record, "stability": stab,
            "noise_floor": floor}
        # Its chart is drawn by the mode that asked (evaluators.plots.plot_layer_mask): the
        # charts live a layer above the run machinery.
        atomic.write_json(workdir / workdir_files.MASK_JSON, record)
    return mask
