"""What each artifact subspace responds to: undo the training of subspace k, measure the change.

FMSD trains K artifact subspaces per adapted layer (DESIGN.md §1.4), each initialised on its
own group of d smallest singular triplets. Whether they learn different things is a claim of
the method that a run should be able to check. The ablation used here is *undoing the training
of subspace k*: its factors U_k, s_k, V_k go back to the pretrained triplets U₀_k, s₀_k, V₀_k
(kept frozen in the run as `SpectralReference`s) in every adapted layer, and the head stays
trained. It is never *zeroing* U_k s_k V_kᵀ: that would also remove the pretrained spectrum
those directions carried at step 0 (W = W_s + Σ_k U₀_k diag(s₀_k) V₀_kᵀ), so the change would
measure damage to the pretrained weight, not what training added.

Why the variants are new `trainable` trees rather than a flag inside the predict function:
the undo is merged once, outside the jitted predict, into a tree of the same structure,
dtypes and shardings as the trained one, so the predict function every evaluation already
compiled scores every variant with no new compile, and the compiled program stays the one
evaluation and prediction run (tests/test_subspaces.py counts the compiles).

Per test set (`subspace_ablation`), for each k: the mean change of the fake logit (the margin
l1 − l0 of the *uncalibrated* logits, the quantity the head's decision moves along) when k is
undone, real and fake frames apart, Δ = trained − k undone, so Δ > 0 on fakes means subspace
k's training pushes fakes towards 'fake'; and the frame AUC with *only* subspace k trained
(every other subspace undone), beside the trained AUC and the AUC with none trained (the
pretrained backbone under the trained head). The rendering (results.md table, chart) is in
`subspace_report`, which imports no jax.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from flax import nnx

from fmsd_jax import parallel
from fmsd_jax.data import pipeline
from fmsd_jax.evaluators import metrics, scoring
from fmsd_jax.evaluators.scoring import process_local
from fmsd_jax.method import decompose as decomp

# The temperature the ablation passes: Δ and AUC are on the uncalibrated margin ('logit'), which
# no temperature changes; any float32 scalar keeps the predict call the one evaluation compiled.
_UNIT_TEMPERATURE = scoring.temperature_arg(1.0)


def subspace_count(run: Any) -> int:
    """K, the artifact subspaces per adapted layer: 0 for a run with no decomposition (full
    fine-tuning, linear probe), 1 for Effort; the ablation needs K > 1."""
    return 0 if run.spec is None else int(run.spec.num_subspaces)


def skip_reason(run: Any) -> str | None:
    """Why the ablation does not apply to `run`, in words for results.md; None where it does."""
    k = subspace_count(run)
    if k == 0:
        return ("this run has no artifact subspaces (its regime trains no decomposition), so "
                "there is no subspace to undo")
    if k == 1:
        return ("this run has one artifact subspace per layer (K = 1): undoing it is undoing "
                "the whole backbone adaptation, which the adaptation section measures; "
                "there are no subspaces to tell apart")
    return None


def undo_columns(run: Any, undo: Iterable[int]) -> np.ndarray:
    """(K·d,) bool: True on the columns of the concatenated factors that subspace `undo` own
    (subspace k owns columns [k·d, (k+1)·d), decompose.DecomposedDense)."""
    k_total, d = subspace_count(run), int(run.spec.rank) if run.spec is not None else 0
    undo = sorted({int(k) for k in undo})
    bad = [k for k in undo if not 0 <= k < k_total]
    if bad:
        raise ValueError(f"subspace(s) {bad} do not exist: this run has {k_total} "
                         f"(0..{k_total - 1})")
    cols = np.zeros((k_total * d,), bool)
    for k in undo:
        cols[k * d:(k + 1) * d] = True
    return cols


@functools.lru_cache(maxsize=8)
def _undo_fn(graphdef: Any) -> Any:
    """jit(trainable, frozen, columns) → trainable with those columns of every decomposed
    layer's U, s, V replaced by U₀, s₀, V₀. `columns` is data, so one compile serves every k."""

    def undo(trainable, frozen, columns):
        model = nnx.merge(graphdef, trainable, frozen)
        for _, m in nnx.iter_modules(model):
            if isinstance(m, decomp.DecomposedDense):
                for name in ("u", "s", "v"):
                    var, ref = getattr(m, name), getattr(m, f"{name}0")
                    var[...] = jnp.where(columns, ref[...].astype(var.dtype), var[...])
        types = set()
        jax.tree.map(lambda v: types.add(type(v)), trainable,
                     is_leaf=lambda x: isinstance(x, nnx.Variable))
        out = nnx.state(model, nnx.Any(*types))
        return jax.tree.map(lambda new, _old: new, out, trainable)  # trainable's own tree

    return jax.jit(undo)


def undo_subspaces(run: Any, trainable: Any, undo: Iterable[int]) -> Any:
    """`trainable` with the training of the subspaces in `undo` undone in every adapted layer.

    The result has `trainable`'s tree, dtypes and shardings (every leaf put back on the
    sharding of the leaf it replaces), so a predict function compiled for `trainable` runs it
    without compiling again. Undoing nothing returns equal leaves bit for bit; undoing every
    subspace is the pretrained backbone (to float32 rounding of W_s + U₀ diag(s₀) V₀ᵀ = W)
    under the trained head. `trainable` itself is not changed.
    """
    if subspace_count(run) == 0:
        raise ValueError("this run has no artifact subspaces to undo (no decomposition)")
    # numpy, not jnp.asarray: staging it eagerly would compile a program of its own
    new = _undo_fn(run.graphdef)(trainable, run.frozen, undo_columns(run, undo))
    return jax.tree.map(lambda n, old: jax.device_put(n, old.sharding), new, trainable)


@dataclasses.dataclass
class Ablations:
    """The trained leaves and the variants the ablation scores, built once per run."""

    trained: Any
    undone: list[Any]  # undone[k]: subspace k undone, the others trained
    only: list[Any]  # only[k]: every subspace but k undone
    none: Any  # every subspace undone: the pretrained backbone under the trained head

    @property
    def num_subspaces(self) -> int:
        return len(self.undone)


def ablations(run: Any, trainable: Any) -> Ablations:
    """Every variant of `trainable` the ablation needs (2K + 1 small trees: only the artifact
    factors and the head are copied, never a frozen weight)."""
    k_total = subspace_count(run)
    everything = range(k_total)
    return Ablations(
        trained=trainable,
        undone=[undo_subspaces(run, trainable, [k]) for k in everything],
        only=[undo_subspaces(run, trainable, [j for j in everything if j != k])
              for k in everything],
        none=undo_subspaces(run, trainable, everything))


def fake_logit(predict: Any, trainable: Any, frozen: Any, images: jax.Array) -> jax.Array:
    """The fake logit (margin l1 − l0 of the uncalibrated logits) of scoring.make_predict_fn's
    predict."""
    return predict(trainable, frozen, images, _UNIT_TEMPERATURE)["logit"]


def per_input_subspaces(run: Any, predict: Any, variants: Ablations,
                        images: jax.Array) -> np.ndarray:
    """(B, K) float32: for each image of a device batch, each subspace's Δ fake logit (trained
    minus that subspace undone). Rows of a padded batch are computed like any other; the
    caller drops them. This process's rows only on several hosts."""
    trained = _host_rows(fake_logit(predict, variants.trained, run.frozen, images))
    cols = [trained - _host_rows(fake_logit(predict, t, run.frozen, images))
            for t in variants.undone]
    return np.stack(cols, axis=1).astype(np.float32)


def subspace_ablation(cfg: mlc.ConfigDict, run: Any, trainable: Any, predict: Any,
                      dataset_name: str, split: str = "test",
                      variants: Ablations | None = None) -> dict[str, Any]:
    """One test set's ablation record (see the module docstring for what each number is).

    Every variant scores each batch as it is read, so the set is read and decoded once for
    all 2K + 2 variants. Pass `variants` (from `ablations`) to build them once for several
    sets. A run the ablation does not apply to gets {'dataset', 'skipped': reason}.
    """
    reason = skip_reason(run)
    if reason is not None:
        return {"dataset": dataset_name, "split": split, "skipped": reason}
    variants = variants or ablations(run, trainable)
    order = [variants.trained, variants.none, *variants.undone, *variants.only]
    logits: list[list[np.ndarray]] = [[] for _ in order]
    labels, valid = [], []
    loader = pipeline.make_eval_loader(
        cfg.data, dataset_name, split=split, batch_size=cfg.eval.batch_size,
        shard_index=jax.process_index(), shard_count=jax.process_count())
    for batch in loader:
        images = parallel.global_batch(run.mesh, batch, ("image",))["image"]
        for out, t in zip(logits, order, strict=True):
            out.append(_host_rows(fake_logit(predict, t, run.frozen, images)))
        labels.append(np.asarray(batch["label"]))
        valid.append(np.asarray(batch["valid"], bool))
    keep = np.concatenate(valid) if valid else np.zeros(0, bool)
    y = (np.concatenate(labels) >= 1)[keep] if labels else np.zeros(0, bool)
    margins = [np.concatenate(m)[keep].astype(np.float64) if m else np.zeros(0) for m in logits]
    if jax.process_count() > 1:
        y, *margins = _gather_rows([y.astype(np.int32), *margins])
        y = y.astype(bool)
    return ablation_record(dataset_name, split, y, margins[0], margins[1],
                           margins[2:2 + variants.num_subspaces],
                           margins[2 + variants.num_subspaces:], rank=int(run.spec.rank))


def ablation_record(dataset_name: str, split: str, is_fake: np.ndarray, trained: np.ndarray,
                    none: np.ndarray, undone: list[np.ndarray], only: list[np.ndarray],
                    *, rank: int) -> dict[str, Any]:
    """The record from per-frame fake logits: trained, none trained, each k undone, only k.

    AUCs are DeepfakeBench's frame AUC (metrics.roc) of sigmoid(margin) in float64, which is
    P(fake) at temperature 1 and ranks frames exactly as the margin does: a float32
    probability would tie the frames whose margins exceed ~17."""
    y = np.asarray(is_fake, bool)
    n_fake, n_real = int(y.sum()), int((~y).sum())

    def auc(margin: np.ndarray) -> float:
        if n_fake == 0 or n_real == 0:
            return math.nan
        return float(metrics.roc(_sigmoid(margin), y.astype(np.int64), name=dataset_name)[2])

    def stats(delta: np.ndarray, rows: np.ndarray) -> tuple[float, float]:
        d = delta[rows]
        if d.size == 0:
            return math.nan, math.nan
        return float(d.mean()), float(d.std(ddof=1)) if d.size > 1 else math.nan

    subspaces = []
    for k, (u, o) in enumerate(zip(undone, only, strict=True)):
        delta = trained - u
        (dr, dr_sd), (df, df_sd) = stats(delta, ~y), stats(delta, y)
        subspaces.append({"subspace": k, "delta_real": dr, "delta_real_sd": dr_sd,
                          "delta_fake": df, "delta_fake_sd": df_sd, "only_frame_auc": auc(o)})
    return {"dataset": dataset_name, "split": split, "num_subspaces": len(undone), "rank": rank,
            "num_real": n_real, "num_fake": n_fake, "trained_frame_auc": auc(trained),
            "none_trained_frame_auc": auc(none), "subspaces": subspaces}


def _sigmoid(margin: np.ndarray) -> np.ndarray:
    m = np.asarray(margin, np.float64)
    return np.exp(-np.logaddexp(0.0, -m))  # 1 / (1 + e^-m) without overflow


def _host_rows(global_array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in order."""
    return np.asarray(global_array) if jax.process_count() == 1 else process_local(global_array)


def _gather_rows(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Every process's rows of each 1-D array, concatenated in process order (shards may keep
    different counts: padded to the largest and cut by a gathered validity mask)."""
    from jax.experimental import multihost_utils

    n_local = len(arrays[0])
    n = int(np.max(multihost_utils.process_allgather(np.asarray([n_local]))))
    valid = np.asarray(multihost_utils.process_allgather(np.arange(n) < n_local)).reshape(-1)
    out = []
    for a in arrays:
        g = np.asarray(multihost_utils.process_allgather(np.pad(a, (0, n - n_local))))
        out.append(g.reshape(-1)[valid])
    return out
