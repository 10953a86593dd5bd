"""The charts: ROC curves, the layer scores the mask was chosen from, the adaptation
charts. Drawn with matplotlib's object API on an Agg canvas (no pyplot state, no display)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from fmsd_jax import atomic
from fmsd_jax.evaluators.result_files import fmt, run_title, to_float
from fmsd_jax.run import workdir_files

# The smallest text on a chart (cell numbers, legends, dense tick labels), in points at the
# saved size: 8 pt at the 120 dpi `save_figure` writes is 13 px, readable without zooming in.
SMALL_FONT = 8


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    FigureCanvasAgg(fig)
    with atomic.replacing(out) as tmp:  # a run killed mid-savefig leaves the old chart
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return out


# --------------------------------------------------------------------------------------
# charts


def plot_roc(
    curves: Mapping[str, tuple[Any, Any, float]],
    path: str | os.PathLike[str],
    *,
    title: str = "ROC (frame level)",
    video_curves: Mapping[str, tuple[Any, Any, float]] | None = None,
    train_families: Sequence[str] = (),
) -> Path:
    """ROC chart with a curve per dataset (``name -> (fpr, tpr, auc)``), AUC in the legend.

    With ``video_curves`` (the same, from per-video mean probabilities) the chart has two
    panels, frame level and video level, under ``title`` (name the method in it: a reader
    comparing several runs' charts must know which is which). A curve of one of the
    ``train_families`` says so in the legend: its AUC measures fit, not generalisation."""
    return save_figure(roc_figure(curves, title=title, video_curves=video_curves,
                                  train_families=train_families), path)


def plot_reliability(reliability: Mapping[str, Mapping[str, Mapping[str, Any]]],
                     path: str | os.PathLike[str], *, temperature: float,
                     title: str = "Reliability of P(fake)") -> Path:
    """Reliability diagrams, one panel per test set (``name -> {'before', 'after'}`` from
    `calibration.reliability`): the fraction of fakes in each P(fake) bin against the bin's
    mean P(fake), before (softmax) and after the validation temperature; the diagonal is a
    calibrated detector, and the bars under it how many frames each bin holds."""
    names = list(reliability) or ["(no test set)"]
    cols = min(len(names), 3)
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 4.0 * rows), layout="constrained")
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
        for key, style, label in (("before", "o-", "softmax"),
                                  ("after", "s-", f"T = {temperature:.3g}")):
            r = reliability.get(name, {}).get(key)
            if not r:
                continue
            pts = [(m, f) for m, f in zip(r["mean_prob"], r["frac_fake"], strict=True)
                   if m is not None]
            if pts:
                m, f = zip(*pts, strict=True)
                ax.plot(m, f, style, ms=3, lw=1.2, label=label)
        r = reliability.get(name, {}).get("after")
        if r:
            edges = np.asarray(r["edges"])
            counts = np.asarray(r["count"], float)
            share = counts / max(counts.sum(), 1.0)
            ax.bar(edges[:-1], share * 0.25 / max(share.max(), 1e-12), width=np.diff(edges),
                   align="edge", color="0.85", zorder=0, label="frames per bin (after)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean P(fake) in bin")
        ax.set_ylabel("fraction fake")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=SMALL_FONT, loc="upper left")
    fig.suptitle(title)
    return save_figure(fig, path)


def roc_figure(
    curves: Mapping[str, tuple[Any, Any, float]],
    *,
    title: str = "ROC (frame level)",
    video_curves: Mapping[str, tuple[Any, Any, float]] | None = None,
    train_families: Sequence[str] = (),
) -> Figure:
    """The figure `plot_roc` saves."""
    if not curves:
        raise ValueError("plot_roc needs at least one curve")
    panels = [("frame level", curves)] + ([("video level", video_curves)] if video_curves else [])
    fig = Figure(figsize=(5.5 * len(panels), 5.0), layout="constrained")
    for i, (level, level_curves) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        _roc_panel(ax, level_curves, train_families)
        ax.set_title(level if len(panels) > 1 else title, fontsize=10 if len(panels) > 1 else None)
    if len(panels) > 1:
        fig.suptitle(title)
    return fig


def _roc_panel(
    ax: Any, curves: Mapping[str, tuple[Any, Any, float]], train_families: Sequence[str]
) -> None:
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    for name, (fpr, tpr, auc) in curves.items():
        fpr, tpr = np.asarray(fpr, float), np.asarray(tpr, float)
        if fpr.shape != tpr.shape:
            raise ValueError(f"ROC of {name!r}: fpr {fpr.shape} and tpr {tpr.shape} differ")
        if fpr.size == 0:
            continue  # undefined ROC (single-class set): listed nowhere rather than faked
        mark = " (training family)" if name in train_families else ""
        ax.plot(fpr, tpr, linewidth=1.6, label=f"{name}{mark}: AUC {fmt(to_float(auc), 3)}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (real flagged as fake)")
    ax.set_ylabel("true positive rate (fake detected)")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


# Labelled ticks per decade, coarse to fine (`_log_ticks`); the largest gap in the finest is
# 1 -> 2, 0.3 decades.
_LOG_SUBS = ((1.0, 3.0), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0, 7.0))


# Colour cycle without red, which marks the selected layers.
_NOT_RED = tuple(f"C{i}" for i in range(10) if i != 3)


def _log_tick_values(lo: float, hi: float) -> list[float]:
    """Where a log axis from ``lo`` to ``hi`` gets labelled ticks: the coarsest of decades,
    1-3, 1-2-5 or 1-2-3-5-7 per decade that puts at least three in range.

    Matplotlib labels minor ticks itself when an axis spans about a decade or less, and its
    2×10⁻³, 3×10⁻³, 4×10⁻³ … run into each other on a 5-inch panel; these tiers keep
    neighbours at least ~0.15 decades apart wherever they give three labels. Fewer than two
    in range (a sliver of a decade): the ends and the geometric middle."""
    lo, hi = sorted((float(lo), float(hi)))
    if not (lo > 0 and math.isfinite(hi)) or hi / lo < 1 + 1e-9:
        return [lo] if lo > 0 else []
    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    stride = max(1, math.ceil((e1 - e0) / 8))  # at most ~8 decade labels

    def within(subs: Sequence[float], step: int = 1) -> list[float]:
        vals = [m * 10.0**e for e in range(e0, e1 + 1) if e % step == 0 for m in subs]
        return [v for v in vals if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]

    tiers = [within((1.0,), stride)] + [within(subs) for subs in _LOG_SUBS]
    values = next((t for t in tiers if len(t) >= 3), tiers[-1])
    return values if len(values) >= 2 else [float(v) for v in np.geomspace(lo, hi, 3)]


def _sci(value: float, _pos: Any = None) -> str:
    """``2×10⁻³`` / ``10⁻³`` as mathtext, two significant digits."""
    if value <= 0 or not math.isfinite(value):
        return ""
    e = math.floor(math.log10(value) + 1e-9)
    m = float(f"{value / 10.0**e:.2g}")
    if m >= 10:
        m, e = m / 10, e + 1
    return f"$10^{{{e}}}$" if m == 1 else f"${m:g}\\times10^{{{e}}}$"


def _log_ticks(axis: Any, lo: float, hi: float) -> None:
    """Give a log-scaled axis (or a log colorbar's long axis) `_log_tick_values`' labels and
    leave its other ticks unlabelled."""
    axis.set_major_locator(FixedLocator(_log_tick_values(lo, hi)))
    axis.set_major_formatter(FuncFormatter(_sci))
    axis.set_minor_formatter(NullFormatter())


def _log_limits(values: Any) -> tuple[float, float]:
    """Data range of positive ``values`` with 5 % of its log span as margin, so no point sits
    on the frame."""
    lo, hi = float(np.min(values)), float(np.max(values))
    pad = max(math.log10(hi / lo), 0.1) * 0.05
    return lo / 10**pad, hi * 10**pad


def plot_layer_mask(workdir: str | os.PathLike[str], regime: str) -> Path | None:
    """WORKDIR/layer_scores.png drawn from layer_mask.json, when the mask is newer than the
    chart (it was estimated just now) or the chart is missing; None when there is no mask
    (a regime without one). Called by the modes that estimate a mask (train, mask)."""
    workdir = Path(workdir)
    record_path = workdir / workdir_files.MASK_JSON
    chart = workdir / workdir_files.LAYER_SCORES_PNG
    if not record_path.is_file():
        return None
    if chart.is_file() and chart.stat().st_mtime_ns >= record_path.stat().st_mtime_ns:
        return chart
    record = atomic.read_json(record_path)
    return plot_layer_scores(record, record["targets"], np.asarray(record["mask"], bool), chart,
                             title="Forgery-aware layer scores: " + run_title(regime, workdir))


def plot_layer_scores(
    scores: Mapping[str, Any],
    target_names: Sequence[str],
    mask: Any,
    path: str | os.PathLike[str],
    *,
    layer_names: Sequence[str] | None = None,
    score_label: str | None = None,
    title: str = "Forgery-aware layer scores",
) -> Path:
    """Save `layer_scores_figure` (the same arguments) as a PNG at ``path``."""
    return save_figure(layer_scores_figure(scores, target_names, mask, layer_names=layer_names,
                                           score_label=score_label, title=title), path)


def layer_scores_figure(
    scores: Mapping[str, Any],
    target_names: Sequence[str],
    mask: Any,
    *,
    layer_names: Sequence[str] | None = None,
    score_label: str | None = None,
    title: str = "Forgery-aware layer scores",
) -> Figure:
    """Chart of the layer-masking statistics, to see *why* layers were selected.

    ``title`` should name the method and run (``"Layer scores: " + run_title(...)``); how the
    head was prepared is appended from the record.

    Left: ``score`` per block (rows) × candidate projection (columns), log colour scale when
    all scores are positive (GSNR-like scores span orders of magnitude), selected cells boxed.
    Right (when ``bias`` and ``variance`` are given): every candidate as a point in
    bias–variance space (log–log), selected ones ringed; the score is bias / variance, so the
    dashed line through the weakest selected layer is the selection boundary for top-k. That
    line is drawn only when the score really is bias / variance (not for the per-element GSNR
    average, whose ranking the scatter cannot show). ``scores`` may be the whole mask record
    (extra keys are ignored; its ``score_kind`` names the score unless ``score_label`` does).
    """
    score = np.asarray(scores["score"], dtype=np.float64)
    if score.ndim != 2:
        raise ValueError(f"scores['score'] must be (layers, targets), got shape {score.shape}")
    n_layers, n_targets = score.shape
    if len(target_names) != n_targets:
        raise ValueError(f"{len(target_names)} target_names for {n_targets} score columns")
    sel = np.asarray(mask, dtype=bool)
    if sel.shape != score.shape:
        raise ValueError(f"mask shape {sel.shape} differs from score shape {score.shape}")
    rows = list(layer_names) if layer_names is not None else [str(i) for i in range(n_layers)]
    if len(rows) != n_layers:
        raise ValueError(f"{len(rows)} layer_names for {n_layers} layers")
    kind = str(scores.get("score_kind") or "")
    score_label = score_label or {"bias_variance": "bias / variance", "gsnr": "mean GSNR"}.get(
        kind, kind or "score"
    )
    has_bv = "bias" in scores and "variance" in scores
    stab = scores.get("stability") or None
    has_stab = bool(stab) and len(stab.get("seeds", ())) > 1
    bias = np.asarray(scores["bias"], float) if has_bv else None
    var = np.asarray(scores["variance"], float) if has_bv else None
    if has_bv and (bias.shape != score.shape or var.shape != score.shape):
        raise ValueError(
            f"bias {bias.shape} / variance {var.shape} must match score shape {score.shape}"
        )

    height = max(3.5, 0.32 * n_layers + 1.5)
    n_panels = 1 + has_bv + has_stab
    fig = Figure(
        figsize=(4.0 + 0.7 * n_targets + 5.5 * (n_panels - 1), height), layout="constrained"
    )
    ax = fig.add_subplot(1, n_panels, 1)
    finite = score[np.isfinite(score)]
    use_log = finite.size > 0 and bool(np.all(finite > 0))
    norm = (
        LogNorm(vmin=finite.min(), vmax=max(finite.max(), finite.min() * (1 + 1e-9)))
        if use_log
        else Normalize(
            vmin=finite.min() if finite.size else 0, vmax=finite.max() if finite.size else 1
        )
    )
    im = ax.imshow(score, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    for i, j in zip(*np.nonzero(sel), strict=True):
        ax.add_patch(
            Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.0)
        )
    if n_layers * n_targets <= 256:
        for i in range(n_layers):
            for j in range(n_targets):
                ax.text(
                    j, i, f"{score[i, j]:.2g}", ha="center", va="center", fontsize=SMALL_FONT,
                    color="white" if norm(score[i, j]) < 0.5 else "black",
                )  # fmt: skip
    ax.set_xticks(range(n_targets), [str(t) for t in target_names])
    ax.set_yticks(range(n_layers), rows, fontsize=SMALL_FONT)
    ax.set_xlabel("candidate projection")
    ax.set_ylabel("block")
    ax.set_title(f"score ({int(sel.sum())} of {sel.size} selected, boxed)", fontsize=9)
    cbar = fig.colorbar(im, ax=ax, label=f"score = {score_label}" + (" (log)" if use_log else ""))
    if use_log:
        _log_ticks(cbar.ax.yaxis, norm.vmin, norm.vmax)

    if has_bv:
        ax2 = fig.add_subplot(1, n_panels, 2)
        pos = (bias > 0) & (var > 0)
        for j, name in enumerate(target_names):
            col = pos[:, j]
            ax2.scatter(var[col, j], bias[col, j], s=18, label=str(name), alpha=0.8,
                        color=_NOT_RED[j % len(_NOT_RED)])
        both = sel & pos
        ax2.scatter(
            var[both], bias[both], s=70, facecolors="none", edgecolors="red", linewidths=1.5,
            label="selected",
        )  # fmt: skip
        if np.any(pos):
            ax2.set_xscale("log")
            ax2.set_yscale("log")
            for axis, values, set_lim in ((ax2.xaxis, var[pos], ax2.set_xlim),
                                          (ax2.yaxis, bias[pos], ax2.set_ylim)):
                lo, hi = _log_limits(values)
                set_lim(lo, hi)
                _log_ticks(axis, lo, hi)
            ratio = bias / np.where(var > 0, var, 1.0)
            is_ratio = bool(np.allclose(score[pos], ratio[pos], rtol=1e-3))
            if np.any(both) and is_ratio:
                # Boundary bias = s_min * variance for the weakest selected layer.
                s_min = float(np.min(bias[both] / var[both]))
                xs = np.geomspace(var[pos].min(), var[pos].max(), 50)
                ax2.plot(xs, s_min * xs, "--", color="red", linewidth=1, alpha=0.6)
        ax2.set_xlabel("gradient variance  mean_t ‖g(t) − ḡ‖²")
        ax2.set_ylabel("gradient bias  ‖ḡ‖²")
        ax2.set_title("bias vs variance per candidate layer", fontsize=9)
        ax2.grid(alpha=0.3, which="both")
        ax2.legend(fontsize=SMALL_FONT, loc="best")
    if has_stab:
        _stability_panel(fig.add_subplot(1, n_panels, n_panels), stab)
    head = scores.get("head") or {}
    if head:
        how = (f"head warmed {head.get('warmup_steps')} steps on the frozen backbone"
               if head.get("kind") == "warmed" else "random head (no warm-up)")
        title = f"{title}; {how}"
    fig.suptitle(title)
    return fig


def _stability_panel(ax: Any, stab: Mapping[str, Any]) -> None:
    """Rank of every cell under each seed against its rank under the first seed: a stable
    ranking lies on the diagonal."""
    seeds = list(stab["seeds"])
    ranks = [np.argsort(np.argsort(-np.asarray(sc, float).ravel(), kind="stable"), kind="stable")
             for sc in stab["scores"]]
    n = ranks[0].size
    ax.plot([0, n - 1], [0, n - 1], "--", color="0.6", linewidth=1)
    for k in range(1, len(seeds)):
        ax.scatter(ranks[0], ranks[k], s=14, alpha=0.8, label=f"seed {seeds[k]}")
    ax.set_xlabel(f"rank under seed {seeds[0]} (the mask used)")
    ax.set_ylabel("rank under another head/data seed")
    ax.set_title(f"ranking stability: Spearman ρ mean {fmt(stab.get('mean_spearman'), 2)} "
                 f"(min {fmt(stab.get('min_spearman'), 2)}), selected-set overlap "
                 f"{fmt(stab.get('mean_overlap'), 2)}", fontsize=9)
    ax.invert_xaxis()
    ax.invert_yaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=SMALL_FONT, loc="best")


# On a log axis two spectra closer than this (relative) are one line to the eye.
_COINCIDE = 0.01


def plot_adaptation(
    diag: Mapping[str, Any], path: str | os.PathLike[str], *, title: str | None = None
) -> Path:
    """Save `adaptation_figure` as a PNG at ``path``."""
    return save_figure(adaptation_figure(diag, title=title), path)


def adaptation_figure(diag: Mapping[str, Any], *, title: str | None = None) -> Figure:
    """How far the backbone moved: relative change per (block, projection), spectra of the
    most-moved layers before/after, and the change of each singular value (diagnostics.json).

    The pretrained spectrum is drawn as open circles *over* the trained line, so it is seen
    even where the two coincide (a short run at Effort's lr moves σ by ~1e-4 relative), and the
    panel says in words how far apart they are. ``title`` names the method and run (default:
    the record's regime); the contribution verdict follows it."""
    wc = diag["weight_change"]
    rel = np.asarray(wc["relative"], float)
    mask = np.asarray(wc["mask"], bool)
    targets = list(wc["targets"])
    spectra = list(diag.get("spectra") or [])
    fig = Figure(figsize=(4.0 + 0.6 * len(targets) + (9.0 if spectra else 0),
                          max(3.8, 0.3 * rel.shape[0] + 1.8)), layout="constrained")
    ax = fig.add_subplot(1, 3, 1) if spectra else fig.add_subplot()
    im = ax.imshow(rel, aspect="auto", cmap="magma", interpolation="nearest",
                   norm=Normalize(vmin=0.0, vmax=max(float(rel.max()), 1e-12)))
    for i, j in zip(*np.nonzero(mask), strict=True):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="cyan", lw=1.5))
    ax.set_xticks(range(len(targets)), targets)
    ax.set_yticks(range(rel.shape[0]), [str(i) for i in range(rel.shape[0])],
                  fontsize=SMALL_FONT)
    ax.set_xlabel("candidate projection")
    ax.set_ylabel("block")
    ax.set_title("‖W − W₀‖ / ‖W₀‖ (adapted cells boxed)", fontsize=9)
    fig.colorbar(im, ax=ax)
    if spectra:
        _spectra_panels(fig.add_subplot(1, 3, 2), fig.add_subplot(1, 3, 3), spectra)
    c = diag.get("contribution")
    sub = (c["verdict"] if c else diag.get("contribution_note") or "contribution not measured")
    head = title or f"Backbone adaptation: {run_title(diag.get('regime'))}"
    fig.suptitle(f"{head} — {sub}", fontsize=9)
    return fig


def _marked(change: np.ndarray, evenly: int = 25, moved: int = 40) -> list[int]:
    """Indices of a spectrum that get a pretrained marker: ``evenly`` spread over it (first
    and last included) and the ``moved`` most-changed ones that changed visibly, so the
    pretrained value shows exactly where the trained line leaves it (the artifact subspaces
    sit on the smallest singular values, at the tail)."""
    n = change.size
    even = np.unique(np.linspace(0, n - 1, min(n, evenly)).round().astype(int))
    top = np.argsort(-change, kind="stable")[:moved]
    return sorted({*even.tolist(), *(int(i) for i in top if change[i] >= _COINCIDE)})


def _spectra_panels(ax2: Any, ax3: Any, spectra: Sequence[Mapping[str, Any]]) -> None:
    """Spectra before (circles, on top) and after (line), and after − before."""
    gap = 0.0  # largest |σ − σ₀| / σ₀ over the plotted spectra
    for k, sp in enumerate(spectra):
        before, after = np.asarray(sp["before"], float), np.asarray(sp["after"], float)
        label = f"block {sp['layer']} {sp['target']}"
        color = f"C{k % 10}"
        ax2.semilogy(after, "-", color=color, linewidth=1.2, label=label, zorder=2)
        change = np.abs(after - before) / np.where(before > 0, before, np.inf)
        ax2.semilogy(before, linestyle="none", marker="o", markersize=5, markerfacecolor="none",
                     markeredgecolor=color, markeredgewidth=1.0, zorder=3,
                     markevery=_marked(change))
        ax3.plot(after - before, color=color, linewidth=1, label=label)
        gap = max(gap, float(np.max(change, initial=0.0)))
    # Style key: which mark is which, independent of the layer colours.
    ax2.plot([], [], "-", color="0.3", label="trained (line)")
    ax2.plot([], [], linestyle="none", marker="o", markerfacecolor="none", markeredgecolor="0.3",
             label="pretrained (○)")
    words = ("they coincide at this scale" if gap < _COINCIDE
             else "they differ")
    ax2.set_title(f"spectrum: pretrained (○) vs trained (line)\n{words}: largest "
                  f"|σ − σ₀| / σ₀ = {gap:.1e}", fontsize=9)
    ax2.set_xlabel("singular value index")
    ax2.legend(fontsize=SMALL_FONT)
    ax3.axhline(0.0, color="0.6", linewidth=0.8)
    ax3.set_xlabel("singular value index")
    ax3.set_title("σ_trained − σ_pretrained", fontsize=9)
    for a in (ax2, ax3):
        a.grid(alpha=0.3)
