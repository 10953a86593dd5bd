"""Result files and charts: results.json/.md, ROC and layer-score PNGs, the demo report.

Everything here is a pure function of numbers already computed by ``fmsd_jax.metrics`` (or the
layer-mask estimator), so a report can be regenerated from a workdir without a model or a
device. Two rules from the DeepfakeBench literature shape the output:

* frame-level and video-level numbers never share a column (papers that mix them are not
  comparable, e.g. Effort's video-level AUCs next to SeLop's frame-level ones);
* NaN (a metric undefined on a single-class set) is shown as ``n/a`` and stored as JSON
  ``null``, never as a number an average would silently swallow.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, not ``pyplot``, so
writing a chart never changes the caller's global backend or leaks figures in a long run.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from fmsd_jax import atomic
from fmsd_jax.errors import AlreadyExists
from fmsd_jax.metrics import METRIC_KEYS

__all__ = [
    "DemoRow",
    "Verdict",
    "adaptation_figure",
    "compare_to_baselines",
    "demo_table",
    "held_out_mean",
    "layer_scores_figure",
    "method_name",
    "plot_adaptation",
    "plot_layer_scores",
    "plot_roc",
    "read_results",
    "roc_figure",
    "results_table",
    "run_title",
    "sweep_table",
    "write_demo_report",
    "write_results",
]

# Display names of the training regimes (method.regime), in reports and chart titles.
METHOD_NAMES = {
    "fmsd": "FMSD",
    "effort": "Effort (K=1, d=1, no mask)",
    "full": "Full fine-tuning",
    "linear_probe": "Linear probe",
}
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
ROC_PNG = "roc.png"
DIAGNOSTICS_JSON = "diagnostics.json"  # written by fmsd_jax.diagnostics, shown in results.md

# Column order and headers of results.md; the level is in every header so that no reader
# can take a frame-level number for a video-level one.
_RESULT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("frame_auc", "AUC (frame)"),
    ("ap", "AP (frame)"),
    ("acc", "ACC@0.5 (frame)"),
    ("eer", "EER (frame)"),
    ("video_auc", "AUC (video)"),
)
_COUNT_KEYS = ("num_frames", "num_videos")
# The smallest text on a chart (cell numbers, legends, dense tick labels), in points at the
# saved size: 8 pt at the 120 dpi `_save` writes is 13 px, readable without zooming in.
SMALL_FONT = 8


# --------------------------------------------------------------------------------------
# small helpers


def _to_float(value: Any) -> float:
    if value is None:
        return math.nan
    return float(value)  # also unwraps numpy / jax scalars


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _nanmean(values: Sequence[float]) -> tuple[float, int]:
    """Mean of the finite values and how many there were."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return (float(np.mean(finite)) if finite else math.nan), len(finite)


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    FigureCanvasAgg(fig)
    with atomic.replacing(out) as tmp:  # a run killed mid-savefig leaves the old chart
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return out


def reports_pointing_at(target: str | os.PathLike[str],
                        own: Sequence[str | os.PathLike[str]] = ()) -> list[Path]:
    """The Markdown reports beside `target` or one folder up (the demo's report.md above its
    rows) that name it by its path relative to themselves, other than `own` (the reports the
    writing mode rewrites itself). Such a report would silently describe another file if
    `target` were replaced under it."""
    target = Path(target).absolute()
    mine = {Path(p).absolute() for p in own}
    found = []
    for folder in (target.parent, target.parent.parent):
        name = target.relative_to(folder).as_posix()
        for md in sorted(folder.glob("*.md")):
            if md.absolute() in mine or not md.is_file():
                continue
            try:
                text = md.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if re.search(rf"(?<![\w./-]){re.escape(name)}(?![\w/-]|\.\w)", text):
                found.append(md)
    return found


def refuse_replacing_reported(targets: Sequence[str | os.PathLike[str]],
                              own: Sequence[str | os.PathLike[str]], what: str,
                              allow: str) -> None:
    """AlreadyExists, before any work, when one of `targets` exists and another report points
    at it; `allow` names the flag that replaces them anyway."""
    hits = {(Path(t), md) for t in targets if Path(t).exists()
            for md in reports_pointing_at(t, own)}
    if hits:
        t, md = sorted(hits)[0]
        raise AlreadyExists(
            f"{md} points at {t}; {what} would replace it under that report. Pass {allow} to "
            "replace it anyway (the report then describes the earlier file), or copy the "
            "workdir and run on the copy")


def method_name(regime: str) -> str:
    return METHOD_NAMES.get(regime, regime)


def run_title(regime: str | None, workdir: str | os.PathLike[str] | None = None) -> str:
    """The method and the run a chart belongs to, e.g. ``FMSD (w1)``: every chart's title
    carries it, since charts of several runs are compared side by side once they leave their
    workdir. The workdir is left out when its name is just the regime (the demo's row
    directories ``fmsd``, ``effort``, ...), where it would only repeat the method."""
    name = method_name(regime) if regime else "unknown method"
    run = Path(workdir).name if workdir is not None else ""
    return f"{name} ({run})" if run and run != regime else name


def held_out_mean(
    results: Mapping[str, Mapping[str, Any]],
    key: str,
    train_families: Sequence[str],
    families: Sequence[str] | None = None,
) -> tuple[float, int, int]:
    """Mean of ``key`` over the held-out families: (mean, how many were defined, how many are
    held out).

    Held out are the ``families`` (default: those in ``results``) not in ``train_families``;
    a family missing from ``results`` or undefined there (NaN) is left out of the mean, so a
    caller can mark a partial mean. results.md and the demo report both use this, so their
    held-out means cannot disagree."""
    held = [f for f in (results if families is None else families) if f not in train_families]
    values = [_to_float(results[f].get(key)) if f in results else math.nan for f in held]
    mean, n = _nanmean(values)
    return mean, n, len(held)


# --------------------------------------------------------------------------------------
# results.json / results.md


def _normalise_results(
    results: Mapping[str, Mapping[str, Any]],
) -> dict[str, dict[str, float | int]]:
    out: dict[str, dict[str, float | int]] = {}
    for dataset, metrics in results.items():
        missing = [k for k in METRIC_KEYS if k not in metrics]
        if missing:
            raise ValueError(
                f"results for {dataset!r} lack metric(s) {missing}; expected keys {METRIC_KEYS} "
                "(as returned by fmsd_jax.metrics.compute_metrics)"
            )
        row: dict[str, float | int] = {k: _to_float(metrics[k]) for k in METRIC_KEYS}
        for k in _COUNT_KEYS:
            if k in metrics and metrics[k] is not None:
                row[k] = int(metrics[k])
        out[str(dataset)] = row
    return out


def results_table(
    results: Mapping[str, Mapping[str, Any]], *, train_families: Sequence[str] | None = None
) -> str:
    """The Markdown table of ``results.md``: one row per dataset, then the means.

    With ``train_families`` (the run's ``data.train_dataset``) a test set of a training family
    is marked, and the first mean is the **held-out mean**, over the other test sets only: a
    test set of the family the detector was trained on says nothing about generalisation, and
    averaging it in flatters the number the reader looks for. The mean over all test sets
    follows, labelled as such, when it differs; with no held-out test set the table says so.
    Without ``train_families`` (not known) only the all-sets mean is given."""
    norm = _normalise_results(results)
    train = None if train_families is None else [str(f) for f in train_families]
    header = ["dataset", "frames", "videos"] + [h for _, h in _RESULT_COLUMNS]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for dataset, m in norm.items():
        cells = [
            _md_escape(dataset) + (" (training family)" if train and dataset in train else ""),
            str(m.get("num_frames", "")),
            str(m.get("num_videos", "")) if m.get("num_videos") else "",
        ]
        cells += [_fmt(float(m[k])) for k, _ in _RESULT_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    held = [d for d in norm if train is None or d not in train]
    # (label, the families left out of the mean): the held-out mean leaves out the training
    # families; the all-sets mean leaves out none.
    means: list[tuple[str, Sequence[str]]] = []
    if train is not None and held and len(norm) > 1:
        what = "all " if len(held) == len(norm) else ""
        means.append((f"**held-out mean** ({what}{_sets(len(held))})", train))
    if len(norm) > 1 and len(held) < len(norm):
        tail = "training family included" if held else "all training families"
        means.append((f"all-sets mean ({_sets(len(norm))}, {tail})", ()))
    elif train is None and len(norm) > 1:
        means.append((f"**all-sets mean** ({_sets(len(norm))})", ()))
    partial = False
    for label, excluded in means:
        cells = [label, "", ""]
        for k, _ in _RESULT_COLUMNS:
            mean, n, of = held_out_mean(norm, k, excluded)
            partial |= 0 < n < of
            cells.append(_fmt(mean) + ("†" if 0 < n < of else ""))
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if train is not None:
        if held and len(held) < len(norm):
            notes.append(f"Held-out mean: over the test sets not in the training families "
                         f"({_md_escape(', '.join(train))}): {_md_escape(', '.join(held))}.")
        elif not held:
            notes.append(f"No held-out test set: every test set is a training family "
                         f"({_md_escape(', '.join(train))}), so nothing here measures "
                         "generalisation to unseen forgeries.")
    if partial:
        notes.append("† averaged over the datasets where the metric is defined "
                     "(n/a: a single-class set, or no video ids).")
    return "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in notes)


def _sets(n: int) -> str:
    return f"{n} test set" + ("" if n == 1 else "s")


def write_results(
    workdir: str | os.PathLike[str],
    results: Mapping[str, Mapping[str, Any]],
    *,
    title: str = "Evaluation results",
    notes: Sequence[str] = (),
    diagnostics: Mapping[str, Any] | None = None,
    train_families: Sequence[str] | None = None,
) -> tuple[Path, Path]:
    """Write ``workdir/results.json`` and ``workdir/results.md``, replacing earlier ones.

    ``--mode evaluate`` calls this again on a finished run, so both files are rewritten whole
    (atomically) rather than merged. JSON holds ``dataset -> metric -> value`` with the five
    DFB metric keys as floats (``null`` where undefined) and the frame/video counts as ints.
    ``diagnostics`` (the run's diagnostics.json) adds the backbone's contribution and how far
    the adapted layers moved below the table. ``train_families`` marks the training family's
    row and gives the held-out mean (`results_table`); results.json stays numbers only (the
    training family is in config.json), so its readers see the same schema as before.
    """
    norm = _normalise_results(results)
    wd = Path(workdir)
    json_path, md_path = wd / RESULTS_JSON, wd / RESULTS_MD
    serialisable = {
        d: {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}
        for d, m in norm.items()
    }
    atomic.write_json(json_path, serialisable, sort_keys=False, allow_nan=False)
    md = [f"# {title}", ""]
    md += [
        "DeepfakeBench metrics: frame-level AUC / AP / ACC (threshold 0.5, strict) / EER, and "
        "video-level AUC (mean frame probability per video). Frame- and video-level numbers "
        "are in separate columns and must not be compared with each other.",
        "",
    ]
    md += [f"- {n}" for n in notes] + ([""] if notes else [])
    md.append(results_table(norm, train_families=train_families))
    if diagnostics is not None:
        md += ["", adaptation_section(diagnostics)]
    atomic.write_text(md_path, "\n".join(md))
    return json_path, md_path


def adaptation_section(diag: Mapping[str, Any]) -> str:
    """results.md's account of whether the backbone adapted (see fmsd_jax/diagnostics.py)."""
    lines = ["## Did the backbone adapt?", ""]
    c = diag.get("contribution")
    if c is None:
        lines.append(f"Backbone contribution: {diag.get('contribution_note') or 'not measured'}.")
    else:
        lines += [
            f"Backbone contribution on the {_md_escape(c['split'])} split of "
            f"{_md_escape(', '.join(c['datasets']))} ({c['num_videos']} videos, "
            f"{c['num_frames']} frames; checkpoint: {diag.get('checkpoint') or '?'} step "
            f"{diag.get('step')}): AUC of the trained detector minus AUC of the pretrained "
            "backbone carrying the trained head, 95 % interval from a paired bootstrap over "
            f"{c['unit']}s ({c['resamples']} resamples).",
            "",
            "| level | trained | pretrained backbone + trained head | contribution "
            "| 95 % interval |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, level in (("frame_auc", "AUC (frame)"), ("video_auc", "AUC (video)")):
            if key not in c:
                continue
            lo, hi = (_to_float(x) for x in c["ci95"][key])
            lines.append(f"| {level} | {_fmt(_to_float(c['trained'][key]))} | "
                         f"{_fmt(_to_float(c['pretrained_backbone'][key]))} | "
                         f"{_to_float(c[key]):+.4f} | [{lo:+.4f}, {hi:+.4f}] |")
        lines += ["", f"**{_md_escape(c['verdict'][:1].upper() + c['verdict'][1:])}.**"]
    wc = diag.get("weight_change")
    if wc:
        rel = np.asarray(wc["relative"], float)
        mask = np.asarray(wc["mask"], bool)
        moved = rel[mask] if mask.any() else rel.ravel()
        lines += ["", f"Adapted layers ({int(mask.sum())} of {mask.size} candidate cells): "
                      f"‖W − W₀‖/‖W₀‖ median {_fmt(float(np.median(moved)), 4)}, max "
                      f"{_fmt(float(moved.max()), 4)} ({_md_escape(wc.get('note', ''))}); the "
                      f"head moved {_fmt(_to_float(diag.get('head_change')), 3)} of its norm. "
                      "Chart: adaptation.png; numbers: diagnostics.json."]
    return "\n".join(lines) + "\n"


def read_results(workdir: str | os.PathLike[str]) -> dict[str, dict[str, float | int]]:
    """Load ``results.json`` back, with ``null`` turned into NaN."""
    path = Path(workdir) / RESULTS_JSON
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; run `python -m fmsd_jax.main --mode evaluate "
            f"--workdir {workdir} ...` first"
        )
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {d: {k: (math.nan if v is None else v) for k, v in m.items()} for d, m in raw.items()}


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
    return _save(roc_figure(curves, title=title, video_curves=video_curves,
                            train_families=train_families), path)


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
        ax.plot(fpr, tpr, linewidth=1.6, label=f"{name}{mark}: AUC {_fmt(_to_float(auc), 3)}")
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
    return _save(layer_scores_figure(scores, target_names, mask, layer_names=layer_names,
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
    ax.set_title(f"ranking stability: Spearman ρ mean {_fmt(stab.get('mean_spearman'), 2)} "
                 f"(min {_fmt(stab.get('min_spearman'), 2)}), selected-set overlap "
                 f"{_fmt(stab.get('mean_overlap'), 2)}", fontsize=9)
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
    return _save(adaptation_figure(diag, title=title), path)


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


# --------------------------------------------------------------------------------------
# demo report


@dataclass(frozen=True)
class DemoRow:
    """One trained method: its per-family metrics and the command that produced them."""

    method: str
    results: Mapping[str, Mapping[str, Any]]
    command: str
    note: str = ""
    # Validation frame AUC of the trained detector minus that of the pretrained backbone with
    # the trained head (None: not measured, e.g. the linear probe, whose backbone is frozen).
    contribution: float | None = None
    contribution_ci: tuple[float, float] | None = None  # its 95 % interval, when measured
    contribution_videos: int | None = None  # validation videos it was measured on


def _videos(rows: Sequence[DemoRow]) -> str:
    n = {r.contribution_videos for r in rows if r.contribution_videos}
    return f", {n.pop()} videos" if len(n) == 1 else ""


@dataclass(frozen=True)
class Verdict:
    """How our method compares with one baseline on the held-out families."""

    baseline: str
    families: tuple[str, ...]
    ours_frame: float
    base_frame: float
    ours_video: float
    base_video: float
    frame_wins: int
    frame_losses: int
    video_wins: int
    video_losses: int
    n_frame: int
    n_video: int
    tie_tol: float

    @staticmethod
    def _cmp(ours: float, base: float, tol: float) -> int:
        if not (math.isfinite(ours) and math.isfinite(base)):
            return 0
        d = ours - base
        return 1 if d > tol else (-1 if d < -tol else 0)

    @property
    def frame(self) -> int:
        """+1 better, -1 worse, 0 tie/undefined on mean held-out frame AUC."""
        return self._cmp(self.ours_frame, self.base_frame, self.tie_tol)

    @property
    def video(self) -> int:
        return self._cmp(self.ours_video, self.base_video, self.tie_tol)

    @property
    def beats(self) -> bool:
        """Better on mean held-out AUC at both levels (a level that is undefined is skipped)."""
        levels = [
            c
            for c, o, b in (
                (self.frame, self.ours_frame, self.base_frame),
                (self.video, self.ours_video, self.base_video),
            )
            if math.isfinite(o) and math.isfinite(b)
        ]
        return bool(levels) and all(c > 0 for c in levels)


def _rows(rows: Sequence[DemoRow | Mapping[str, Any]]) -> list[DemoRow]:
    out = []
    for r in rows:
        out.append(r if isinstance(r, DemoRow) else DemoRow(**dict(r)))
    names = [r.method for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate method names in demo rows: {names}")
    return out


def _families(rows: Sequence[DemoRow], train_families: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        for f in r.results:
            if f not in seen:
                seen.append(f)
    return [f for f in seen if f in train_families] + [f for f in seen if f not in train_families]


def _metric(row: DemoRow, family: str, key: str) -> float:
    m = row.results.get(family)
    return _to_float(m.get(key)) if m is not None else math.nan


def compare_to_baselines(
    rows: Sequence[DemoRow | Mapping[str, Any]],
    *,
    ours: str = "FMSD",
    train_families: Sequence[str],
    tie_tol: float = 0.005,
) -> list[Verdict]:
    """Compare ``ours`` with every other row on the families it was not trained on.

    Means are over the held-out families where both methods have a value, so a family one
    method was not evaluated on cannot tilt the comparison. Differences within ``tie_tol``
    (AUC) count as ties: a single-seed demo cannot resolve them.
    """
    all_rows = _rows(rows)
    by_name = {r.method: r for r in all_rows}
    if ours not in by_name:
        raise ValueError(f"no row for our method {ours!r}; rows: {list(by_name)}")
    me = by_name[ours]
    held = [f for f in _families(all_rows, train_families) if f not in train_families]
    if not held:
        raise ValueError(
            f"no held-out family: every evaluated family is a training family {train_families}"
        )
    verdicts = []
    for base in all_rows:
        if base.method == ours:
            continue
        per_level: dict[str, tuple[float, float, int, int, int]] = {}
        for key in ("frame_auc", "video_auc"):
            pairs = [(_metric(me, f, key), _metric(base, f, key)) for f in held]
            pairs = [(o, b) for o, b in pairs if math.isfinite(o) and math.isfinite(b)]
            wins = sum(o - b > tie_tol for o, b in pairs)
            losses = sum(b - o > tie_tol for o, b in pairs)
            o_mean = float(np.mean([o for o, _ in pairs])) if pairs else math.nan
            b_mean = float(np.mean([b for _, b in pairs])) if pairs else math.nan
            per_level[key] = (o_mean, b_mean, wins, losses, len(pairs))
        fo, fb, fw, fl, fn = per_level["frame_auc"]
        vo, vb, vw, vl, vn = per_level["video_auc"]
        verdicts.append(
            Verdict(base.method, tuple(held), fo, fb, vo, vb, fw, fl, vw, vl, fn, vn, tie_tol)
        )
    return verdicts


def _verdict_sentence(v: Verdict, ours: str) -> str:
    def level(name: str, o: float, b: float, wins: int, losses: int, n: int, c: int) -> str:
        if n == 0:
            return f"{name} AUC: not available"
        word = {1: "higher", -1: "lower", 0: f"tied within ±{v.tie_tol:g}"}[c]
        return (
            f"{name} AUC {_fmt(o, 3)} vs {_fmt(b, 3)} ({o - b:+.3f}, {word}; better on "
            f"{wins}, worse on {losses} of {n} families)"
        )

    detail = "; ".join(
        [
            level("frame", v.ours_frame, v.base_frame, v.frame_wins, v.frame_losses, v.n_frame,
                  v.frame),
            level("video", v.ours_video, v.base_video, v.video_wins, v.video_losses, v.n_video,
                  v.video),
        ]
    )  # fmt: skip
    if v.beats:
        head = f"**{ours} beats {v.baseline}** on the held-out families"
    elif v.frame < 0 and v.video <= 0 or v.video < 0 and v.frame <= 0:
        head = (
            f"**{ours} does not beat {v.baseline}; {v.baseline} is better** "
            "on the held-out families"
        )
    elif v.frame > 0 or v.video > 0:
        head = f"**{ours} does not clearly beat {v.baseline}** (mixed) on the held-out families"
    else:
        head = f"**{ours} does not beat {v.baseline}** (tie) on the held-out families"
    return f"{head}: {detail}."


def demo_table(
    rows: Sequence[DemoRow | Mapping[str, Any]], *, train_families: Sequence[str]
) -> str:
    """Method × test-family Markdown table, frame AUC and video AUC as separate sub-columns."""
    all_rows = _rows(rows)
    fams = _families(all_rows, train_families)
    header = ["method"]
    for f in fams:
        tag = " (train)" if f in train_families else ""
        header += [f"{_md_escape(f)}{tag} · frame AUC", f"{_md_escape(f)}{tag} · video AUC"]
    header += ["held-out mean · frame AUC", "held-out mean · video AUC",
               "backbone contribution · val frame AUC [95 %]"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for r in all_rows:
        cells = [_md_escape(r.method)]
        for f in fams:
            cells += [_fmt(_metric(r, f, "frame_auc")), _fmt(_metric(r, f, "video_auc"))]
        for key in ("frame_auc", "video_auc"):
            mean, n, of = held_out_mean(r.results, key, train_families, fams)
            cells.append(_fmt(mean) + ("" if n == of else "†") if n else "n/a")
        c, ci = r.contribution, r.contribution_ci
        cells.append("n/a" if c is None or not math.isfinite(c) else f"{c:+.4f}" + (
            f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def below_chance_sentences(
    rows: Sequence[DemoRow | Mapping[str, Any]], *, train_families: Sequence[str]
) -> list[str]:
    """One sentence per held-out family on which some method's frame AUC is below 0.5: what
    that means, for which methods it holds, and whether the video level agrees."""
    all_rows = _rows(rows)
    out = []
    for fam in _families(all_rows, train_families):
        if fam in train_families:
            continue
        frame = {r.method: _metric(r, fam, "frame_auc") for r in all_rows}
        video = {r.method: _metric(r, fam, "video_auc") for r in all_rows}
        below = [m for m, v in frame.items() if math.isfinite(v) and v < 0.5]
        if not below:
            continue
        finite = [v for v in frame.values() if math.isfinite(v)]
        lo, hi = min(finite), max(finite)
        who = (
            f"every method ({len(below)} of {len(all_rows)})"
            if len(below) == len(all_rows)
            else f"{len(below)} of {len(all_rows)} methods ({', '.join(below)}; not "
            + ", ".join(m for m in frame if m not in below)
            + ")"
        )
        v_below = [m for m in below if math.isfinite(video[m]) and video[m] < 0.5]
        v_text = (
            "the video level agrees for all of them"
            if len(v_below) == len(below)
            else f"at video level {len(v_below)} of them stay below 0.5"
        )
        out.append(
            f"**{_md_escape(fam)} is below chance for {who}**: frame AUC "
            f"{_fmt(lo, 3)}–{_fmt(hi, 3)}; {v_text}. An AUC under 0.5 means the ranking is "
            f"inverted: the detector gives {fam}'s fakes a *lower* fake score than its real "
            f"frames, so what it learned to call fake on {', '.join(train_families)} points the "
            f"other way on this artifact (a flipped score would reach {_fmt(1 - hi, 3)}–"
            f"{_fmt(1 - lo, 3)}, but nothing in training can choose that sign)."
        )
    return out


def sweep_table(
    points: Sequence[Mapping[str, Any]], chosen: Mapping[str, float], *, metric: str = "frame_auc"
) -> str:
    """The learning-rate sweep as Markdown: one row per method, one column per backbone lr,
    each cell the best validation ``metric`` (and the step it was reached at), the chosen lr
    marked. Only validation numbers exist here: the sweep never evaluates a test set."""
    lrs = sorted({float(p["lr"]) for p in points})
    methods = list(dict.fromkeys(str(p["method"]) for p in points))
    by = {(str(p["method"]), float(p["lr"])): p for p in points}
    header = ["method", "head lr"] + [f"lr {lr:g}" for lr in lrs] + ["chosen lr"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for m in methods:
        head = next(float(p["head_lr"]) for p in points if p["method"] == m)
        cells = [_md_escape(m), f"{head:g}"]
        for lr in lrs:
            p = by.get((m, lr))
            if p is None:
                cells.append("")
                continue
            best = p["best"]
            text = f"{_fmt(_to_float(best.get(metric)))} @{best.get('step')}"
            if p.get("contribution") is not None:
                text += f" (Δ {float(p['contribution']):+.3f})"
            cells.append(f"**{text}**" if chosen.get(m) == lr else text)
        cells.append(f"{chosen[m]:g}" if m in chosen else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return (
        "\n".join(lines)
        + f"\n\nCells: best validation {metric} of the run @ the step it was reached at "
        "(the checkpoint that run would keep) and, where measured, (Δ the backbone's "
        "contribution: validation frame AUC minus that of the pretrained backbone with the "
        "same head); bold: the chosen lr.\n"
    )


def _contribution_note(r: DemoRow, tol: float) -> str:
    """Words for one row's backbone contribution: noise is its 95 % interval containing 0
    when one was measured, else |contribution| <= tol."""
    c, ci = float(r.contribution), r.contribution_ci
    span = f"95 % interval [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else f"tolerance ±{tol:g}"
    within = ci[0] <= 0.0 <= ci[1] if ci else abs(c) <= tol
    if within and abs(c) <= tol:
        return (
            f"- **{_md_escape(r.method)}: the backbone did not adapt; the head did the work** "
            f"(contribution {c:+.4f}, {span}, contains 0)."
        )
    if within:  # a large estimate on too few validation videos to tell it from zero
        return (
            f"- {_md_escape(r.method)}: contribution {c:+.4f}, but its {span} contains 0: the "
            "validation split is too small to tell it from zero."
        )
    sign = "adds" if c > 0 else "loses"
    return (
        f"- {_md_escape(r.method)}: the adapted backbone {sign} {abs(c):.4f} validation frame "
        f"AUC against the pretrained one with the same head ({span})."
    )


def write_demo_report(
    path: str | os.PathLike[str],
    rows: Sequence[DemoRow | Mapping[str, Any]],
    *,
    train_families: Sequence[str],
    ours: str = "FMSD",
    layer_chart: str | os.PathLike[str] | None = None,
    roc_charts: Mapping[str, str | os.PathLike[str]] | None = None,
    title: str = "FMSD demo: cross-forgery generalisation",
    intro: Sequence[str] = (),
    tie_tol: float = 0.005,
    contribution_tol: float = 0.01,
    sections: Sequence[str] = (),
) -> Path:
    """Write the demo's ``report.md`` and return its path.

    The verdict against each baseline is computed from ``rows`` (``compare_to_baselines``),
    never written by hand, so a run where FMSD loses says so; so are the backbone-contribution
    notes (``contribution_tol``: the half-width called "no adaptation") and the sentence on
    each held-out family some method scores below chance on. ``sections`` are extra Markdown
    blocks placed before the reproduce commands. Chart paths are linked relative to the report
    so the workdir can be moved or published as is.
    """
    out = Path(path)
    all_rows = _rows(rows)
    verdicts = compare_to_baselines(
        all_rows, ours=ours, train_families=train_families, tie_tol=tie_tol
    )
    held = verdicts[0].families if verdicts else ()
    contribution_notes = [
        _contribution_note(r, contribution_tol)
        for r in all_rows
        if r.contribution is not None and math.isfinite(r.contribution)
    ]

    def link(p: str | os.PathLike[str]) -> str:
        return Path(os.path.relpath(Path(p).resolve(), out.parent.resolve())).as_posix()

    md = [f"# {title}", ""]
    md += [*intro, ""] if intro else []
    md += [
        f"Trained on: {', '.join(train_families)}. "
        f"Held out (not seen in training): {', '.join(held) or 'none'}.",
        "",
        "## Results",
        "",
        "AUC per test family. Frame AUC ranks single frames; video AUC ranks videos by their mean "
        "frame probability (DeepfakeBench's definitions). The two are separate columns and are "
        "not comparable with each other.",
        "",
        demo_table(all_rows, train_families=train_families),
    ]
    if any("†" in line for line in md[-1].splitlines()[2:]):
        md += ["† mean over the held-out families where the metric is defined.", ""]
    md += [
        "Backbone contribution: validation frame AUC (the validation split of "
        f"{', '.join(train_families)}, the checkpoint-selection split{_videos(all_rows)}) of "
        "the trained detector minus that of the *pretrained* backbone carrying the same "
        "trained head; the interval is a paired bootstrap over validation videos. Near zero, "
        "the head did the work and the "
        "method's adaptation did not act; n/a where the backbone is frozen or it was not "
        "measured.",
        "",
    ]
    md += [*contribution_notes, ""] if contribution_notes else []
    chance = below_chance_sentences(all_rows, train_families=train_families)
    md += [*(f"- {c}" for c in chance), ""] if chance else []
    md += ["## Does FMSD beat the baselines?", ""]
    if verdicts:
        n_beaten = sum(v.beats for v in verdicts)
        md.append(
            f"{ours} beats {n_beaten} of {len(verdicts)} baselines on the held-out families "
            f"(higher mean AUC at both frame and video level by more than {tie_tol:g})."
        )
        md.append("")
        md += [f"- {_verdict_sentence(v, ours)}" for v in verdicts]
    else:
        md.append("No baseline rows were given.")
    md.append("")
    if layer_chart is not None or roc_charts:
        md += ["## Charts", ""]
        if layer_chart is not None:
            md += [
                f"Layer scores used by {ours}'s forgery-aware masking (selected layers boxed): "
                f"[{link(layer_chart)}]({link(layer_chart)})",
                "",
                f"![layer scores]({link(layer_chart)})",
                "",
            ]
        for name, p in (roc_charts or {}).items():
            md += [
                f"ROC curves, {_md_escape(name)}: [{link(p)}]({link(p)})",
                "",
                f"![ROC {name}]({link(p)})",
                "",
            ]
    for section in sections:
        md += [section, ""]
    md += ["## Reproduce", "", "Each row comes from one command:", ""]
    for r in all_rows:
        label = f"**{r.method}**" + (f" — {r.note}" if r.note else "")
        md += [label, "", "```bash", r.command, "```", ""]
    atomic.write_text(out, "\n".join(md))
    return out
