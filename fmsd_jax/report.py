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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from fmsd_jax import atomic
from fmsd_jax.metrics import METRIC_KEYS

__all__ = [
    "DemoRow",
    "Verdict",
    "compare_to_baselines",
    "demo_table",
    "plot_layer_scores",
    "plot_roc",
    "read_results",
    "results_table",
    "write_demo_report",
    "write_results",
]

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"

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


# --------------------------------------------------------------------------------------
# small helpers


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename so a run killed mid-write never leaves half a report."""
    atomic.write_text(path, text)


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
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", dpi=120, bbox_inches="tight")
    return out


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


def results_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The Markdown table of ``results.md``: one row per dataset plus an average row."""
    norm = _normalise_results(results)
    header = ["dataset", "frames", "videos"] + [h for _, h in _RESULT_COLUMNS]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for dataset, m in norm.items():
        cells = [
            _md_escape(dataset),
            str(m.get("num_frames", "")),
            str(m.get("num_videos", "")) if m.get("num_videos") else "",
        ]
        cells += [_fmt(float(m[k])) for k, _ in _RESULT_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    footnote = ""
    if len(norm) > 1:
        cells = ["**average**", "", ""]
        partial = False
        for k, _ in _RESULT_COLUMNS:
            mean, n = _nanmean([float(m[k]) for m in norm.values()])
            partial |= 0 < n < len(norm)
            cells.append(_fmt(mean) + ("†" if 0 < n < len(norm) else ""))
        lines.append("| " + " | ".join(cells) + " |")
        if partial:
            footnote = (
                "\n† averaged over the datasets where the metric is defined "
                "(n/a: a single-class set, or no video ids).\n"
            )
    return "\n".join(lines) + "\n" + footnote


def write_results(
    workdir: str | os.PathLike[str],
    results: Mapping[str, Mapping[str, Any]],
    *,
    title: str = "Evaluation results",
    notes: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write ``workdir/results.json`` and ``workdir/results.md``, replacing earlier ones.

    ``--mode evaluate`` calls this again on a finished run, so both files are rewritten whole
    (atomically) rather than merged. JSON holds ``dataset -> metric -> value`` with the five
    DFB metric keys as floats (``null`` where undefined) and the frame/video counts as ints.
    """
    norm = _normalise_results(results)
    wd = Path(workdir)
    json_path, md_path = wd / RESULTS_JSON, wd / RESULTS_MD
    serialisable = {
        d: {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in m.items()}
        for d, m in norm.items()
    }
    _atomic_write_text(json_path, json.dumps(serialisable, indent=2, allow_nan=False) + "\n")
    md = [f"# {title}", ""]
    md += [
        "DeepfakeBench metrics: frame-level AUC / AP / ACC (threshold 0.5, strict) / EER, and "
        "video-level AUC (mean frame probability per video). Frame- and video-level numbers "
        "are in separate columns and must not be compared with each other.",
        "",
    ]
    md += [f"- {n}" for n in notes] + ([""] if notes else [])
    md.append(results_table(norm))
    _atomic_write_text(md_path, "\n".join(md))
    return json_path, md_path


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
) -> Path:
    """One ROC chart with a curve per dataset (``name -> (fpr, tpr, auc)``), AUC in the legend."""
    if not curves:
        raise ValueError("plot_roc needs at least one curve")
    fig = Figure(figsize=(5.5, 5.0))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    for name, (fpr, tpr, auc) in curves.items():
        fpr, tpr = np.asarray(fpr, float), np.asarray(tpr, float)
        if fpr.shape != tpr.shape:
            raise ValueError(f"ROC of {name!r}: fpr {fpr.shape} and tpr {tpr.shape} differ")
        if fpr.size == 0:
            continue  # undefined ROC (single-class set): listed nowhere rather than faked
        ax.plot(fpr, tpr, linewidth=1.6, label=f"{name} (AUC {_fmt(_to_float(auc), 3)})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (real flagged as fake)")
    ax.set_ylabel("true positive rate (fake detected)")
    ax.set_title(title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


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
    """Chart of the layer-masking statistics, to see *why* layers were selected.

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
    bias = np.asarray(scores["bias"], float) if has_bv else None
    var = np.asarray(scores["variance"], float) if has_bv else None
    if has_bv and (bias.shape != score.shape or var.shape != score.shape):
        raise ValueError(
            f"bias {bias.shape} / variance {var.shape} must match score shape {score.shape}"
        )

    height = max(3.5, 0.32 * n_layers + 1.5)
    fig = Figure(
        figsize=(4.0 + 0.7 * n_targets + (5.5 if has_bv else 0), height), layout="constrained"
    )
    ax = fig.add_subplot(1, 2, 1) if has_bv else fig.add_subplot()
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
                    j, i, f"{score[i, j]:.2g}", ha="center", va="center", fontsize=6,
                    color="white" if norm(score[i, j]) < 0.5 else "black",
                )  # fmt: skip
    ax.set_xticks(range(n_targets), [str(t) for t in target_names])
    ax.set_yticks(range(n_layers), rows, fontsize=7)
    ax.set_xlabel("candidate projection")
    ax.set_ylabel("block")
    ax.set_title(f"score ({int(sel.sum())} of {sel.size} selected, boxed)", fontsize=9)
    fig.colorbar(im, ax=ax, label=f"score = {score_label}" + (" (log)" if use_log else ""))

    if has_bv:
        ax2 = fig.add_subplot(1, 2, 2)
        pos = (bias > 0) & (var > 0)
        for j, name in enumerate(target_names):
            col = pos[:, j]
            ax2.scatter(var[col, j], bias[col, j], s=18, label=str(name), alpha=0.8)
        both = sel & pos
        ax2.scatter(
            var[both], bias[both], s=70, facecolors="none", edgecolors="red", linewidths=1.5,
            label="selected",
        )  # fmt: skip
        if np.any(pos):
            ax2.set_xscale("log")
            ax2.set_yscale("log")
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
        ax2.legend(fontsize=7, loc="best")
    fig.suptitle(title)
    return _save(fig, path)


# --------------------------------------------------------------------------------------
# demo report


@dataclass(frozen=True)
class DemoRow:
    """One trained method: its per-family metrics and the command that produced them."""

    method: str
    results: Mapping[str, Mapping[str, Any]]
    command: str
    note: str = ""


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
    held = [f for f in fams if f not in train_families]
    header = ["method"]
    for f in fams:
        tag = " (train)" if f in train_families else ""
        header += [f"{_md_escape(f)}{tag} · frame AUC", f"{_md_escape(f)}{tag} · video AUC"]
    header += ["held-out mean · frame AUC", "held-out mean · video AUC"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for r in all_rows:
        cells = [_md_escape(r.method)]
        for f in fams:
            cells += [_fmt(_metric(r, f, "frame_auc")), _fmt(_metric(r, f, "video_auc"))]
        for key in ("frame_auc", "video_auc"):
            vals = [_metric(r, f, key) for f in held]
            mean, n = _nanmean(vals)
            cells.append(_fmt(mean) + ("" if n == len(held) else "†") if n else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
) -> Path:
    """Write the demo's ``report.md`` and return its path.

    The verdict against each baseline is computed from ``rows`` (``compare_to_baselines``),
    never written by hand, so a run where FMSD loses says so. Chart paths are linked relative
    to the report so the workdir can be moved or published as is.
    """
    out = Path(path)
    all_rows = _rows(rows)
    verdicts = compare_to_baselines(
        all_rows, ours=ours, train_families=train_families, tie_tol=tie_tol
    )
    held = verdicts[0].families if verdicts else ()

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
    md += ["## Reproduce", "", "Each row comes from one command:", ""]
    for r in all_rows:
        label = f"**{r.method}**" + (f" — {r.note}" if r.note else "")
        md += [label, "", "```bash", r.command, "```", ""]
    _atomic_write_text(out, "\n".join(md))
    return out
