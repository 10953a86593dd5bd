"""Detection metrics, defined exactly as DeepfakeBench defines them.

Numbers from this module are meant to sit in the same table as published DeepfakeBench
(DFB) results, so every definition follows ``training/metrics/utils.py::get_test_metrics``
rather than what might be more elegant:

* ``frame_auc``: ``sklearn.metrics.auc`` over ``roc_curve(labels, probs)`` (DFB's headline
  ``auc``), with scikit-learn's default ``drop_intermediate=True`` as DFB uses it.
* ``eer``: ``fpr[nanargmin(|fnr - fpr|)]`` on that same ROC, i.e. the false-positive rate at
  the ROC vertex closest to fpr = fnr. DFB does not interpolate between vertices and reports
  fpr (not the mean of fpr and fnr) there; neither do we, so our EER matches theirs bit for bit.
  One inherited quirk: a constant predictor has the ROC (0,0)-(1,1), whose first vertex
  already minimises |fnr - fpr|, so its EER is 0 rather than 0.5; read EER next to the AUC.
* ``ap``: ``average_precision_score(labels, probs)``.
* ``acc``: fraction of frames with ``(prob > 0.5) == label``. The comparison is strict, as in
  DFB: a probability of exactly 0.5 counts as real.
* ``video_auc``: frames are grouped by video; each video's probability is the mean of its
  frame probabilities and its label the mean of its frame labels, then the frame-level AUC
  procedure runs on the per-video pairs. DFB groups by the frame file's parent folder name;
  we take an explicit ``video_id`` per frame, which avoids DFB's collisions between two
  datasets whose videos share a folder name (pass ``dataset/video`` if you pool datasets).
* Labels ``>= 1`` count as fake (DFB maps multi-class labels this way for UCF-style heads).

Two choices DFB leaves implicit, made explicit here:

* **A video whose frames disagree on the label** cannot come from a DFB JSON (the label is
  per video), so it signals a data bug: by default it raises ``ValueError`` naming the video.
  ``mixed_video_label="floor"`` reproduces DFB's ``int(mean label)`` (such a video becomes
  real) for bit-compatibility with legacy outputs.
* **A set with a single class** has no ROC. Rather than crash an evaluation at the end of a
  long run (losing the other datasets' results), ranking metrics (AUC, AP, EER) are NaN and a
  ``UndefinedMetricWarning`` names the set; ACC stays defined. ``evaluators/result_files.py``
  renders NaN as
  ``n/a`` and JSON stores it as ``null``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import numpy as np
from sklearn import metrics as skm

__all__ = [
    "METRIC_KEYS",
    "MetricAccumulator",
    "UndefinedMetricWarning",
    "AGGREGATIONS",
    "aggregate_by_video",
    "compute_metrics",
    "roc",
    "video_auc_by_aggregation",
    "video_score",
]

#: The metric keys every results dict carries, in table order.
METRIC_KEYS: tuple[str, ...] = ("frame_auc", "video_auc", "acc", "ap", "eer")

MixedPolicy = Literal["error", "floor"]

#: How frame probabilities become a video's (`aggregate_by_video`); the first is DFB's.
AGGREGATIONS: tuple[str, ...] = ("mean", "mean_logit", "max", "topk")


class UndefinedMetricWarning(UserWarning):
    """A ranking metric was asked of a set that holds a single class."""


def _as_probs(probs: Any) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    # DFB squeezes (N, 1) predictions; a (N, 2) softmax is a caller bug we must not average.
    if p.ndim == 2 and p.shape[1] == 1:
        p = p[:, 0]
    if p.ndim != 1:
        raise ValueError(
            f"probs must be 1-D (one fake probability per frame), got shape {p.shape}; "
            "for a 2-way softmax pass probs[:, 1]"
        )
    if not np.all(np.isfinite(p)):
        bad = int(np.sum(~np.isfinite(p)))
        raise ValueError(f"probs contain {bad} non-finite values (NaN/inf); the model diverged?")
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(
            f"probs must lie in [0, 1] (got range [{p.min():.4g}, {p.max():.4g}]); "
            "were logits passed instead of probabilities?"
        )
    return p


def _as_labels(labels: Any, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match probs, got {y.shape}")
    if y.size and not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError("labels must be integers (0 = real, >= 1 = fake)")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"labels must be >= 0 (0 = real, >= 1 = fake), got min {y.min()}")
    # DFB: ``y_true[y_true >= 1] = 1``.
    return (y >= 1).astype(np.int64)


def _id_list(video_ids: Sequence[Hashable] | np.ndarray, n: int) -> list[Hashable]:
    """Video ids as plain Python objects (numpy scalars hash like their Python values,
    but ``str`` ids from a numpy ``<U`` array must equal ids given as ``str``)."""
    if isinstance(video_ids, np.ndarray):
        if video_ids.ndim != 1:
            raise ValueError(f"video_ids must be 1-D, got shape {video_ids.shape}")
        keys = video_ids.tolist()
    else:
        keys = list(video_ids)
    if len(keys) != n:
        raise ValueError(f"video_ids must have one id per frame ({n}), got {len(keys)}")
    return [k.item() if isinstance(k, np.generic) else k for k in keys]


def _single_class(labels: np.ndarray) -> bool:
    return np.unique(labels).size < 2


def roc(probs: Any, labels: Any, *, name: str = "set") -> tuple[np.ndarray, np.ndarray, float]:
    """ROC curve and its AUC as DFB computes them, for plotting next to the reported AUC.

    Returns ``(fpr, tpr, auc)``; for a single-class set the curve is empty and the AUC NaN.
    """
    p = _as_probs(probs)
    y = _as_labels(labels, p.size)
    if p.size == 0 or _single_class(y):
        _warn_single_class(name, y, stacklevel=3)
        return np.zeros(0), np.zeros(0), math.nan
    fpr, tpr, _ = skm.roc_curve(y, p, pos_label=1)
    return fpr, tpr, float(skm.auc(fpr, tpr))


def _warn_single_class(name: str, y: np.ndarray, stacklevel: int = 4) -> None:
    present = "no samples" if y.size == 0 else f"only label {int(y[0])}"
    warnings.warn(
        f"{name} has {present}: AUC, AP and EER are undefined and reported as NaN "
        "(a test set needs both real and fake samples)",
        UndefinedMetricWarning,
        stacklevel=stacklevel,
    )


def _ranking_metrics(p: np.ndarray, y: np.ndarray, name: str) -> tuple[float, float, float]:
    """(auc, eer, ap) via DFB's code path; NaNs with a warning when undefined."""
    if p.size == 0 or _single_class(y):
        _warn_single_class(name, y)
        return math.nan, math.nan, math.nan
    fpr, tpr, _ = skm.roc_curve(y, p, pos_label=1)
    auc = float(skm.auc(fpr, tpr))
    fnr = 1.0 - tpr
    eer = float(fpr[np.nanargmin(np.absolute(fnr - fpr))])
    ap = float(skm.average_precision_score(y, p))
    return auc, eer, ap


def aggregate_by_video(
    probs: Any,
    labels: Any,
    video_ids: Sequence[Hashable] | np.ndarray,
    *,
    mixed_video_label: MixedPolicy = "error",
    how: str = "mean",
    topk: int = 4,
) -> tuple[np.ndarray, np.ndarray, list[Hashable]]:
    """Per-video probability and label, in order of each video's first frame.

    ``how`` (see `AGGREGATIONS`): ``mean`` of frame probabilities (DeepfakeBench's, the
    default and what ``video_auc`` uses), ``mean_logit`` (sigmoid of the mean log-odds: one
    confident frame weighs more than under ``mean``), ``max`` (one fake-looking frame decides:
    high recall, more false alarms on long real videos), ``topk`` (mean of the ``topk`` highest,
    between the two; a video with fewer frames uses all of them).

    Exposed so evaluation code can write per-video predictions with exactly the numbers
    that ``video_auc`` is computed from.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"video aggregation must be one of {AGGREGATIONS}, got {how!r}")
    if mixed_video_label not in ("error", "floor"):
        raise ValueError(f"mixed_video_label must be 'error' or 'floor', got {mixed_video_label!r}")
    p = _as_probs(probs)
    y = _as_labels(labels, p.size)
    keys = _id_list(video_ids, p.size)
    index: dict[Hashable, int] = {}
    inv = np.empty(p.size, dtype=np.int64)
    for i, k in enumerate(keys):
        inv[i] = index.setdefault(k, len(index))
    n_vid = len(index)
    counts = np.bincount(inv, minlength=n_vid).astype(np.float64)
    vprob = _video_scores(p, inv, n_vid, counts, how, topk)
    vlab_mean = np.bincount(inv, weights=y.astype(np.float64), minlength=n_vid) / counts
    mixed = (vlab_mean > 0.0) & (vlab_mean < 1.0)
    if np.any(mixed):
        order = list(index)
        bad = [order[i] for i in np.flatnonzero(mixed)]
        if mixed_video_label == "error":
            shown = ", ".join(repr(b) for b in bad[:5]) + (" …" if len(bad) > 5 else "")
            raise ValueError(
                f"{len(bad)} video(s) mix real and fake frame labels: {shown}. A video has one "
                "label in DeepfakeBench data, so this is a data or video-id bug; pass "
                "mixed_video_label='floor' to reproduce DFB (such a video counts as real)."
            )
    # DFB: ``int(label_sum / leng)``, i.e. floor of the mean label.
    vlab = np.floor(vlab_mean).astype(np.int64)
    return vprob, vlab, list(index)


def _video_scores(p: np.ndarray, inv: np.ndarray, n_vid: int, counts: np.ndarray, how: str,
                  topk: int) -> np.ndarray:
    if how == "mean":
        return np.bincount(inv, weights=p, minlength=n_vid) / counts
    if how == "mean_logit":
        q = np.clip(p, 1e-12, 1 - 1e-12)  # a saturated float32 frame (p == 1) stays finite
        z = np.bincount(inv, weights=np.log(q) - np.log1p(-q), minlength=n_vid) / counts
        return 0.5 * (1.0 + np.tanh(0.5 * z))
    out = np.full(n_vid, -np.inf)
    if how == "max":
        np.maximum.at(out, inv, p)
        return out
    # topk: sort by (video, -p), keep each video's first k rows
    order = np.lexsort((-p, inv))
    v_sorted = inv[order]
    first = np.searchsorted(v_sorted, np.arange(n_vid))
    rank = np.arange(p.size) - first[v_sorted]
    keep = order[rank < topk]
    k_counts = np.minimum(counts, topk)
    return np.bincount(inv[keep], weights=p[keep], minlength=n_vid) / k_counts


def video_score(probs: Any, *, how: str = "mean", topk: int = 4) -> float:
    """One video's P(fake) from its frames' (`aggregate_by_video` for a single video): what
    predict prints and the service answers, under the aggregation its thresholds were chosen
    with."""
    p = _as_probs(probs)
    return float(aggregate_by_video(p, np.zeros(p.size, np.int64), [0] * p.size, how=how,
                                    topk=topk)[0][0])


def video_auc_by_aggregation(probs: Any, labels: Any, video_ids: Sequence[Hashable] | np.ndarray,
                             *, topk: int = 4, name: str = "set",
                             mixed_video_label: MixedPolicy = "error") -> dict[str, float]:
    """Video AUC under every aggregation of `AGGREGATIONS` (``topk`` named ``top{k}``)."""
    out = {}
    for how in AGGREGATIONS:
        vp, vy, _ = aggregate_by_video(probs, labels, video_ids, how=how, topk=topk,
                                       mixed_video_label=mixed_video_label)
        key = f"top{topk}" if how == "topk" else how
        # one class: compute_metrics has already warned about this set once
        out[key] = (math.nan if vp.size == 0 or _single_class(vy) else
                    _ranking_metrics(vp, vy, f"{name} (video level, {key})")[0])
    return out


def compute_metrics(
    probs: Any,
    labels: Any,
    video_ids: Sequence[Hashable] | np.ndarray | None = None,
    *,
    name: str = "set",
    mixed_video_label: MixedPolicy = "error",
) -> dict[str, float | int]:
    """DFB's test metrics for one dataset.

    ``probs`` are fake probabilities (one per frame), ``labels`` 0 real / >= 1 fake,
    ``video_ids`` one hashable per frame (any type; equal ids are one video). Without
    ``video_ids`` the video-level AUC is NaN (frames alone cannot say which video they belong
    to) and ``num_videos`` is 0. ``name`` only labels warnings.

    Returns ``frame_auc, video_auc, acc, ap, eer`` as floats and ``num_frames, num_videos``.
    """
    p = _as_probs(probs)
    y = _as_labels(labels, p.size)
    auc, eer, ap = _ranking_metrics(p, y, name)
    acc = float(np.mean((p > 0.5).astype(np.int64) == y)) if p.size else math.nan
    if video_ids is None:
        video_auc, num_videos = math.nan, 0
    else:
        vp, vy, vids = aggregate_by_video(p, y, video_ids, mixed_video_label=mixed_video_label)
        video_auc, _, _ = _ranking_metrics(vp, vy, f"{name} (video level)")
        num_videos = len(vids)
    return {
        "frame_auc": auc,
        "video_auc": video_auc,
        "acc": acc,
        "ap": ap,
        "eer": eer,
        "num_frames": int(p.size),
        "num_videos": int(num_videos),
    }


class MetricAccumulator:
    """Collects host-side evaluation batches, then computes metrics once over all of them.

    AUC, AP and EER are rank statistics of the whole set; they cannot be averaged over
    batches, so the loop keeps every (prob, label, video id) and computes at the end. The
    memory cost is a few bytes per frame (a DFB test set is at most ~10^5 frames).

    Sharded evaluation pads the last batch to a multiple of the device count; ``valid_mask``
    drops those padded rows so they never touch the metrics.
    """

    def __init__(self, *, name: str = "set", mixed_video_label: MixedPolicy = "error") -> None:
        self.name = name
        self.mixed_video_label: MixedPolicy = mixed_video_label
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._vids: list[np.ndarray] = []
        self._logits: list[np.ndarray] = []
        self._with_vids: bool | None = None

    def __len__(self) -> int:
        return sum(int(a.size) for a in self._probs)

    def reset(self) -> None:
        """Forget all batches, so one accumulator can serve consecutive datasets."""
        self._probs, self._labels, self._vids, self._logits = [], [], [], []
        self._with_vids = None

    def add(
        self,
        probs: Any,
        labels: Any,
        video_ids: Sequence[Hashable] | np.ndarray | None = None,
        valid_mask: Any = None,
        logits: Any = None,
    ) -> None:
        """Append one batch; rows where ``valid_mask`` is False are padding and are dropped.
        ``logits`` (the fake margin l1 - l0 per frame) ride along for calibration and the
        subspace ablation; give them for every batch or for none."""
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim == 2 and p.shape[1] == 1:
            p = p[:, 0]
        if p.ndim != 1:
            raise ValueError(f"probs must be 1-D per batch, got shape {p.shape}")
        n = p.shape[0]
        y = np.asarray(labels)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {y.shape}")
        keep = np.ones(n, dtype=bool)
        if valid_mask is not None:
            keep = np.asarray(valid_mask).astype(bool).reshape(-1)
            if keep.shape != (n,):
                raise ValueError(f"valid_mask must have shape ({n},), got {keep.shape}")
        has_vids = video_ids is not None
        if self._with_vids is None:
            self._with_vids = has_vids
        elif self._with_vids != has_vids:
            raise ValueError(
                "video_ids must be given for every batch or for none "
                f"(earlier batches {'had' if self._with_vids else 'had no'} video ids)"
            )
        if has_vids:
            # An object array built element-wise, so tuple ids stay scalars.
            v = np.empty(n, dtype=object)
            for i, k in enumerate(_id_list(video_ids, n)):
                v[i] = k
            self._vids.append(v[keep])
        # Padded rows may hold garbage (NaN logits of zero images); validate only kept rows.
        self._probs.append(_as_probs(p[keep]))
        self._labels.append(y[keep])
        if logits is not None:
            self._logits.append(np.asarray(logits, np.float64).reshape(n)[keep])
        if self._logits and len(self._logits) != len(self._probs):
            raise ValueError("logits must be given for every batch or for none")

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All kept (probs, labels) so far, e.g. for ROC curves or per-frame predictions."""
        p = np.concatenate(self._probs) if self._probs else np.zeros(0)
        y = np.concatenate(self._labels) if self._labels else np.zeros(0, dtype=np.int64)
        return p, y

    def logits(self) -> np.ndarray:
        """All kept fake margins, aligned with ``arrays()`` (empty if never given)."""
        return np.concatenate(self._logits) if self._logits else np.zeros(0)

    def video_ids(self) -> np.ndarray | None:
        """All kept video ids (object array), aligned with ``arrays()``; None if never given."""
        if not self._with_vids:
            return None
        return np.concatenate(self._vids) if self._vids else np.zeros(0, dtype=object)

    def result(self) -> dict[str, float | int]:
        """Metrics over everything added so far, identical to one ``compute_metrics`` call."""
        p, y = self.arrays()
        v = self.video_ids()
        return compute_metrics(p, y, v, name=self.name, mixed_video_label=self.mixed_video_label)


# ---------------------------------------------------------------------------------------------
# Contribution with a paired bootstrap over videos


def weighted_auc(probs: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC (ties count one half, as sklearn's trapezoid) under per-sample weights.

    `weights` is (B, n): one row per bootstrap draw (a sample's multiplicity in the draw), so
    B AUCs come from one sort. With all-ones weights this is DeepfakeBench's AUC.
    """
    order = np.argsort(probs, kind="stable")
    p, y, w = probs[order], labels[order] >= 1, np.atleast_2d(weights)[:, order]
    starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])  # one group per distinct score
    pos = np.add.reduceat(w * y, starts, axis=1)
    neg = np.add.reduceat(w * ~y, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = np.sum(pos * (below + 0.5 * neg), axis=1)
    den = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                     *, resamples: int, seed: int = 0, chunk: int = 100) -> np.ndarray:
    """AUC(a) − AUC(b) on `resamples` draws of the groups (videos) with replacement."""
    n_groups = int(groups.max()) + 1
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        draws = rng.integers(0, n_groups, (rows, n_groups))
        counts = np.stack([np.bincount(d, minlength=n_groups) for d in draws]).astype(float)
        w = counts[:, groups]
        out.append(weighted_auc(a, labels, w) - weighted_auc(b, labels, w))
    return np.concatenate(out)
