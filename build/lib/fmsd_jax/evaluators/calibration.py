"""Temperature scaling and the numbers that say whether a probability can be read as one.

A softmax after cross-entropy training is over-confident, and more so on a forgery family the
detector never saw (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017). The
standard remedy is one temperature T, fitted by negative log-likelihood on held-out data and
applied as softmax(logits / T): it rescales confidence without changing which frame ranks
above which, so AUC, AP, EER and the sign of every decision at 0.5 stay as they are.

Fitting happens on the checkpoint-selection (validation) split only, never a test set: a
deployment does not see its target domain's labels. For two classes softmax(l / T)[1] is
sigmoid((l1 - l0) / T), so everything here works on the fake margin z = l1 - l0.

Definitions (frame level, labels 0 real / >= 1 fake, p = P(fake)):

* ECE: 15 equal-width bins of p over [0, 1] (the last bin closed), sum over bins of
  |bin| / N * |mean p in the bin - fraction of fakes in the bin|. This is the reliability of
  P(fake) itself, which is what `predict` prints, rather than Guo's top-label confidence (for
  two classes that folds p and 1 - p into [0.5, 1] and hides on which side a model errs).
* Brier score: mean of (p - y)^2.
* NLL: mean of -log p(y), with p clipped to [1e-12, 1 - 1e-12] so a saturated wrong frame
  costs ~27.6 nats rather than infinity.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import optimize

ECE_BINS = 15
_EPS = 1e-12
# T is searched in [0.05, 20] on a log scale: beyond those a model is either constant or a
# step function on this set, and the fit says so by landing on the bound.
_LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))


def _labels(labels: Any) -> np.ndarray:
    return (np.asarray(labels).reshape(-1) >= 1).astype(np.float64)


def probs_at(margins: Any, temperature: float) -> np.ndarray:
    """P(fake) = sigmoid(margin / T) in float64 (host side; the device computes the same
    as softmax(logits / T)[:, 1])."""
    z = np.asarray(margins, np.float64).reshape(-1) / float(temperature)
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid without overflow warnings


def nll(probs: Any, labels: Any) -> float:
    p = np.clip(np.asarray(probs, np.float64).reshape(-1), _EPS, 1 - _EPS)
    y = _labels(labels)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))) if p.size else math.nan


def brier(probs: Any, labels: Any) -> float:
    p = np.asarray(probs, np.float64).reshape(-1)
    return float(np.mean((p - _labels(labels)) ** 2)) if p.size else math.nan


def reliability(probs: Any, labels: Any, bins: int = ECE_BINS) -> dict[str, list]:
    """Per bin of P(fake): its edges, frame count, mean P(fake) and fraction of fakes
    (None for an empty bin): the reliability diagram and the ECE are both read off this."""
    p = np.asarray(probs, np.float64).reshape(-1)
    y = _labels(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        mean_p = np.bincount(which, weights=p, minlength=bins) / count
        frac = np.bincount(which, weights=y, minlength=bins) / count
    as_list = lambda a: [None if c == 0 else float(v) for v, c in zip(a, count, strict=True)]
    return {"edges": edges.tolist(), "count": count.astype(int).tolist(),
            "mean_prob": as_list(mean_p), "frac_fake": as_list(frac)}


def ece(probs: Any, labels: Any, bins: int = ECE_BINS) -> float:
    r = reliability(probs, labels, bins)
    n = sum(r["count"])
    if n == 0:
        return math.nan
    return float(sum(c / n * abs(m - f) for c, m, f in
                     zip(r["count"], r["mean_prob"], r["frac_fake"], strict=True) if c))


def summary(probs: Any, labels: Any) -> dict[str, float]:
    return {"ece": ece(probs, labels), "brier": brier(probs, labels), "nll": nll(probs, labels)}


def fit_temperature(margins: Any, labels: Any) -> tuple[float, str | None]:
    """(T, None) minimising the validation NLL of sigmoid(margin / T); (1.0, reason) when the
    set cannot calibrate (one class only, or no frames), and (T, reason) when T lands on the
    upper bound of its search, so the caller says why in one line.

    One class cannot calibrate: its NLL keeps falling as T -> 0 (every frame pushed to the
    right side), which says nothing about confidence on mixed data.
    """
    z = np.asarray(margins, np.float64).reshape(-1)
    y = _labels(labels)
    if z.size == 0:
        return 1.0, "the validation split has no frames"
    if np.unique(y).size < 2:
        return 1.0, (f"the validation split holds only {'fake' if y[0] else 'real'} frames "
                     "(a temperature needs both classes)")

    def loss(log_t: float) -> float:
        return nll(probs_at(z, math.exp(log_t)), y)

    res = optimize.minimize_scalar(loss, bounds=_LOG_T_BOUNDS, method="bounded",
                                   options={"xatol": 1e-6})
    t = float(math.exp(res.x))
    if res.x > _LOG_T_BOUNDS[1] - 1e-3:
        return t, (f"T reached its upper bound {t:.3g}: on validation the margins carry next to "
                   "no information about the label (or rank it the wrong way), so calibration "
                   "flattens every P(fake) towards 0.5")
    return t, None
