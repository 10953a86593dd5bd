"""results.json and results.md: what a run reports, and the guards around them.

Everything here is a pure function of numbers already computed by `evaluators.metrics` (or the
layer-mask estimator), so a report can be regenerated from a workdir without a model or a
device, and importing it pulls in neither jax nor pyplot (tests/test_report.py). Two rules from
the DeepfakeBench literature shape the output:

* frame-level and video-level numbers never share a column (papers that mix them are not
  comparable, e.g. Effort's video-level AUCs next to SeLop's frame-level ones);
* NaN (a metric undefined on a single-class set) is shown as ``n/a`` and stored as JSON
  ``null``, never as a number an average would silently swallow.

The charts are `evaluators.plots`; the demo's report.md is `demo.report`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fmsd_jax import atomic
from fmsd_jax.errors import AlreadyExists
from fmsd_jax.evaluators.metrics import METRIC_KEYS
from fmsd_jax.run.workdir_files import RESULTS_JSON, RESULTS_MD

# Display names of the training regimes (method.regime), in reports and chart titles.
METHOD_NAMES = {
    "fmsd": "FMSD",
    "effort": "Effort (K=1, d=1, no mask)",
    "full": "Full fine-tuning",
    "linear_probe": "Linear probe",
}

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
# Per-dataset sections beside the DFB metrics (modes/evaluate: decision_numbers, and the
# subspace ablation of evaluators/subspaces.py)
DECISION_KEYS = ("calibration", "operating_points", "video_auc_by_aggregation", "subspaces")


# --------------------------------------------------------------------------------------
# small helpers


def to_float(value: Any) -> float:
    if value is None:
        return math.nan
    return float(value)  # also unwraps numpy / jax scalars


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def nanmean(values: Sequence[float]) -> tuple[float, int]:
    """Mean of the finite values and how many there were."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return (float(np.mean(finite)) if finite else math.nan), len(finite)


def md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


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
    values = [to_float(results[f].get(key)) if f in results else math.nan for f in held]
    mean, n = nanmean(values)
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
                "(as returned by fmsd_jax.evaluators.metrics.compute_metrics)"
            )
        row: dict[str, float | int] = {k: to_float(metrics[k]) for k in METRIC_KEYS}
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
            md_escape(dataset) + (" (training family)" if train and dataset in train else ""),
            str(m.get("num_frames", "")),
            str(m.get("num_videos", "")) if m.get("num_videos") else "",
        ]
        cells += [fmt(float(m[k])) for k, _ in _RESULT_COLUMNS]
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
            cells.append(fmt(mean) + ("†" if 0 < n < of else ""))
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if train is not None:
        if held and len(held) < len(norm):
            notes.append(f"Held-out mean: over the test sets not in the training families "
                         f"({md_escape(', '.join(train))}): {md_escape(', '.join(held))}.")
        elif not held:
            notes.append(f"No held-out test set: every test set is a training family "
                         f"({md_escape(', '.join(train))}), so nothing here measures "
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
    decision: Mapping[str, Any] | None = None,
    sections: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write ``workdir/results.json`` and ``workdir/results.md``, replacing earlier ones.

    ``--mode evaluate`` calls this again on a finished run, so both files are rewritten whole
    (atomically) rather than merged. JSON holds ``dataset -> metric -> value`` with the five
    DFB metric keys as floats (``null`` where undefined) and the frame/video counts as ints.
    ``diagnostics`` (the run's diagnostics.json) adds the backbone's contribution and how far
    the adapted layers moved below the table; ``decision`` (decision.json's content) the
    calibration and operating-point tables, from each dataset's `DECISION_KEYS` (kept in
    results.json too); ``sections`` (Markdown, e.g. the subspace ablation's) follow them.
    ``train_families`` marks the training family's row and gives the held-out mean
    (`results_table`); results.json does not repeat it (the training family is in
    config.json): its top level stays one entry per dataset, as before.
    """
    norm = _normalise_results(results)
    wd = Path(workdir)
    json_path, md_path = wd / RESULTS_JSON, wd / RESULTS_MD
    serialisable = {d: _nulls({**m, **{k: results[d][k] for k in DECISION_KEYS
                                       if k in results[d]}})
                    for d, m in norm.items()}
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
    if decision is not None:
        md += ["", decision_section(results, decision, train_families)]
    for section in sections:
        md += ["", section]
    if diagnostics is not None:
        md += ["", adaptation_section(diagnostics)]
    atomic.write_text(md_path, "\n".join(md))
    return json_path, md_path


def adaptation_section(diag: Mapping[str, Any]) -> str:
    """results.md's account of whether the backbone adapted (see
    fmsd_jax/evaluators/adaptation.py)."""
    lines = ["## Did the backbone adapt?", ""]
    c = diag.get("contribution")
    if c is None:
        lines.append(f"Backbone contribution: {diag.get('contribution_note') or 'not measured'}.")
    else:
        lines += [
            f"Backbone contribution on the {md_escape(c['split'])} split of "
            f"{md_escape(', '.join(c['datasets']))} ({c['num_videos']} videos, "
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
            lo, hi = (to_float(x) for x in c["ci95"][key])
            lines.append(f"| {level} | {fmt(to_float(c['trained'][key]))} | "
                         f"{fmt(to_float(c['pretrained_backbone'][key]))} | "
                         f"{to_float(c[key]):+.4f} | [{lo:+.4f}, {hi:+.4f}] |")
        lines += ["", f"**{md_escape(c['verdict'][:1].upper() + c['verdict'][1:])}.**"]
    wc = diag.get("weight_change")
    if wc:
        rel = np.asarray(wc["relative"], float)
        mask = np.asarray(wc["mask"], bool)
        moved = rel[mask] if mask.any() else rel.ravel()
        lines += ["", f"Adapted layers ({int(mask.sum())} of {mask.size} candidate cells): "
                      f"‖W − W₀‖/‖W₀‖ median {fmt(float(np.median(moved)), 4)}, max "
                      f"{fmt(float(moved.max()), 4)} ({md_escape(wc.get('note', ''))}); the "
                      f"head moved {fmt(to_float(diag.get('head_change')), 3)} of its norm. "
                      "Chart: adaptation.png; numbers: diagnostics.json."]
    return "\n".join(lines) + "\n"


def _nulls(obj: Any) -> Any:
    """NaN and inf as JSON null, at any depth."""
    if isinstance(obj, Mapping):
        return {str(k): _nulls(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nulls(v) for v in obj]
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj


def pct(value: Any, digits: int = 1) -> str:
    """A rate as a percentage (``n/a`` where undefined): the operating-point tables'."""
    v = to_float(value)
    return "n/a" if not math.isfinite(v) else f"{100 * v:.{digits}f} %"


def decision_section(results: Mapping[str, Mapping[str, Any]], decision: Mapping[str, Any],
                     train_families: Sequence[str] | None = None) -> str:
    """results.md's calibration, operating-point and video-aggregation tables."""
    fitted = decision.get("fitted_on", {})
    where = (f"the {md_escape(str(fitted.get('split')))} split of "
             f"{md_escape(', '.join(fitted.get('datasets') or [])) or 'no dataset'}")
    train = set(train_families or ())
    mark = lambda d: md_escape(d) + (" (training family)" if d in train else "")  # noqa: E731
    t = to_float(decision.get("temperature"))
    lines = ["## Calibration", ""]
    if decision.get("note") and t == 1.0:
        lines.append(f"Temperature: T = 1 ({md_escape(decision['note'])}).")
    else:
        lines.append(f"Temperature T = {t:.4f}, fitted by NLL on {where} "
                     f"({fitted.get('frames', '?')} frames), never on a test set; P(fake) = "
                     "softmax(logits / T)[fake]. ECE: 15 equal-width bins of P(fake), frame "
                     "level, Σ |bin|/N · |mean P(fake) − fraction fake|. Chart: calibration.png."
                     + (f" Note: {md_escape(decision['note'])}." if decision.get("note") else ""))
    lines += ["", "| dataset | ECE before | ECE after | Brier before | Brier after "
              "| NLL before | NLL after |", "|---|---:|---:|---:|---:|---:|---:|"]
    for d, r in results.items():
        c = r.get("calibration")
        if c:
            b, a = c["before"], c["after"]
            lines.append(f"| {mark(d)} | {fmt(to_float(b['ece']))} | {fmt(to_float(a['ece']))} "
                         f"| {fmt(to_float(b['brier']))} | {fmt(to_float(a['brier']))} "
                         f"| {fmt(to_float(b['nll']))} | {fmt(to_float(a['nll']))} |")
    lines += ["", "## Operating points", ""]
    if not decision.get("thresholds"):
        lines.append(f"No operating points: {md_escape(str(decision.get('note')))}.")
    else:
        lines += [f"Thresholds chosen on {where} (calibrated P(fake) >= threshold is fake), "
                  "then measured on each test set: the TPR and false-alarm rate (FPR) they "
                  "realise there, next to the oracle TPR at the same FPR budget chosen on that "
                  "test set itself (the gap is the cost of not knowing the target domain). "
                  f"Video level: P(fake) of a video is the {decision.get('aggregation')} of its "
                  "frames'.", "",
                  "| dataset | level | point | threshold | TPR | FPR | oracle TPR | gap |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for d, r in results.items():
            for level, points in (r.get("operating_points") or {}).items():
                for name, p in points.items():
                    lines.append(f"| {mark(d)} | {level} | {name} | {p['threshold']:.4g} | "
                                 f"{pct(p['tpr'])} | {pct(p['fpr'])} | "
                                 f"{pct(p['oracle_tpr'])} | {pct(p['tpr_gap'])} |")
    aggs = [(d, r["video_auc_by_aggregation"]) for d, r in results.items()
            if r.get("video_auc_by_aggregation")]
    if aggs:
        keys = list(aggs[0][1])
        lines += ["", "## Video AUC by aggregation of frame probabilities", "",
                  f"`mean` is DeepfakeBench's (the table above); `config.eval.video_aggregation` "
                  f"= {decision.get('aggregation')} is what predict prints.", "",
                  "| dataset | " + " | ".join(keys) + " |",
                  "|---|" + "---:|" * len(keys)]
        for d, a in aggs:
            lines.append(f"| {mark(d)} | " + " | ".join(fmt(to_float(a[k])) for k in keys)
                         + " |")
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
