"""Operating points: thresholds chosen on validation, measured on every test set.

A deployment fixes its threshold where it can: on the split it holds labels for (the run's
validation split). On a forgery family it never saw, the same threshold gives another
false-alarm rate and another detection rate; the difference from the *oracle* (the best
TPR at that FPR on the test set itself, what GenD and DeepfakeBench-style tables report) is
the cost of not knowing the target domain.

Every threshold here is a vertex of scikit-learn's `roc_curve` (all vertices:
`drop_intermediate=False`) on the validation scores, and
a frame (or video) is called fake when its P(fake) >= the threshold, scikit-learn's rule, so
the TPR/FPR read off `roc_curve` at a vertex are exactly what the threshold realises on that
set. (DeepfakeBench's ACC@0.5 keeps its strict `> 0.5`; that one is not an operating point.)

* `fpr@A`: the vertex with the highest TPR among those with FPR <= A (the lowest threshold
  that keeps false alarms within the budget on validation).
* `eer`: the vertex closest to FNR = FPR (`nanargmin |FNR - FPR|`, DeepfakeBench's rule, over
  every vertex).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn import metrics as skm

#: The named operating points every run with a two-class validation split gets.
FPR_TARGETS: tuple[float, ...] = (0.01, 0.05)
NAMES: tuple[str, ...] = ("eer",) + tuple(f"fpr@{a:g}" for a in FPR_TARGETS)
#: The threshold that calls nothing fake (validation had no vertex within the budget).
NOTHING_FLAGGED = float(np.nextafter(1.0, 2.0))


def _roc(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    p = np.asarray(probs, np.float64).reshape(-1)
    y = (np.asarray(labels).reshape(-1) >= 1).astype(int)
    if p.size == 0 or np.unique(y).size < 2:
        return None
    # Every threshold, not scikit-learn's default `drop_intermediate`: a dropped collinear
    # vertex can be the one with the highest TPR within an FPR budget.
    fpr, tpr, thr = skm.roc_curve(y, p, pos_label=1, drop_intermediate=False)
    return fpr, tpr, thr


def _fpr_vertex(fpr: np.ndarray, tpr: np.ndarray, target: float) -> int:
    ok = np.flatnonzero(fpr <= target + 1e-12)  # vertex 0 (FPR 0) always qualifies
    return int(ok[np.argmax(tpr[ok])])


def _eer_vertex(fpr: np.ndarray, tpr: np.ndarray) -> int:
    return int(np.nanargmin(np.abs((1.0 - tpr) - fpr)))


def choose_thresholds(probs: Any, labels: Any) -> dict[str, float] | None:
    """{'eer': t, 'fpr@0.01': t, 'fpr@0.05': t} on this (validation) set; None for a set
    with one class. `NOTHING_FLAGGED` (scikit-learn's first vertex) calls nothing fake."""
    curve = _roc(probs, labels)
    if curve is None:
        return None
    fpr, tpr, thr = curve
    # scikit-learn's first threshold is +inf (nothing flagged); JSON has no inf, and the
    # next float above 1 flags nothing either (a P(fake) never exceeds 1)
    thr = np.minimum(thr, NOTHING_FLAGGED)
    out = {"eer": float(thr[_eer_vertex(fpr, tpr)])}
    for a in FPR_TARGETS:
        out[f"fpr@{a:g}"] = float(thr[_fpr_vertex(fpr, tpr, a)])
    return out


def rates_at(probs: Any, labels: Any, threshold: float) -> dict[str, float]:
    """TPR and FPR realised on this set by calling P(fake) >= threshold fake."""
    p = np.asarray(probs, np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1) >= 1
    fake = p >= threshold
    tpr = float(np.mean(fake[y])) if y.any() else math.nan
    fpr = float(np.mean(fake[~y])) if (~y).any() else math.nan
    return {"tpr": tpr, "fpr": fpr}


def oracle(probs: Any, labels: Any) -> dict[str, dict[str, float]]:
    """What each operating point would give if chosen on this set itself: TPR at FPR <= A,
    and the EER vertex's (TPR, FPR)."""
    curve = _roc(probs, labels)
    if curve is None:
        return {n: {"tpr": math.nan, "fpr": math.nan} for n in NAMES}
    fpr, tpr, _ = curve
    out = {"eer": (lambda i: {"tpr": float(tpr[i]), "fpr": float(fpr[i])})(_eer_vertex(fpr, tpr))}
    for a in FPR_TARGETS:
        i = _fpr_vertex(fpr, tpr, a)
        out[f"fpr@{a:g}"] = {"tpr": float(tpr[i]), "fpr": float(fpr[i])}
    return out


def measure(probs: Any, labels: Any, thresholds: dict[str, float] | None
            ) -> dict[str, dict[str, float]]:
    """Per operating point: the validation threshold, the TPR and FPR it realises on this
    set, and the oracle TPR (and FPR) on this set, with the TPR gap oracle - realised."""
    if not thresholds:
        return {}
    best = oracle(probs, labels)
    out = {}
    for name, t in thresholds.items():
        r = rates_at(probs, labels, t)
        out[name] = {"threshold": float(t), "tpr": r["tpr"], "fpr": r["fpr"],
                     "oracle_tpr": best[name]["tpr"], "oracle_fpr": best[name]["fpr"],
                     "tpr_gap": best[name]["tpr"] - r["tpr"]}
    return out
