"""robustness.json / robustness.md / robustness.png: the tables and chart of
`--mode robustness` (AUC per perturbation type and level, change from clean)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fmsd_jax import atomic
from fmsd_jax.evaluators import plots, result_files
from fmsd_jax.run.workdir_files import ROBUSTNESS, ROBUSTNESS_PNG

AUC_KEYS = ("frame_auc", "video_auc")
LEVEL_NAME = {"frame_auc": "Frame AUC", "video_auc": "Video AUC"}
_LOWER = {"frame_auc": "frame AUC", "video_auc": "video AUC"}


def json_float(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


# ----------------------------------------------------------------------------------------------
# Outputs


def write_outputs(workdir: str | Path, result: Mapping[str, Any],
                  stem: str = ROBUSTNESS) -> tuple[Path, Path, Path]:
    workdir = Path(workdir)
    js = workdir / f"{stem}.json"
    atomic.write_json(js, result, sort_keys=False, allow_nan=False)
    png = plot(result, workdir / f"{stem}.png", workdir=workdir)
    md = workdir / f"{stem}.md"
    atomic.write_text(md, markdown(result, chart=png.name))
    return js, md, png


def _flag(text: str, flags: Mapping[str, bool]) -> str:
    """`*` after a level inside the training augmentation's range, `=` after an identity."""
    return text + (" *" if flags["seen_in_training"] else "") + (" =" if flags["identity"] else "")


def _level_ids(result: Mapping[str, Any]) -> list[str]:
    ids = {lv for t in result["types"].values() for lv in t["levels"]}
    return sorted(ids, key=int)


def type_table(result: Mapping[str, Any], dataset: str, key: str) -> str:
    """Type × level Markdown table of one metric (frame or video AUC) on one dataset."""
    entry = result["datasets"][dataset]
    levels = _level_ids(result)
    header = ["type", "clean"] + [f"L{lv}" for lv in levels] + ["mean"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for tkey, t in result["types"].items():
        got = entry["types"][tkey]
        cells = [f"{tkey} ({result_files.md_escape(t['name'])})",
                 result_files.fmt(entry["clean"][key])]
        cells += [_flag(result_files.fmt(got["levels"][lv][key]), t["levels"][lv])
                  if lv in got["levels"] else ""
                  for lv in levels]
        cells.append(result_files.fmt(got["mean"][key]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| **mean over types** | " + " | ".join([""] * (len(levels) + 1))
                 + f" | **{result_files.fmt(entry['mean'][key])}** |")
    return "\n".join(lines) + "\n"


def change_table(result: Mapping[str, Any], dataset: str) -> str:
    entry = result["datasets"][dataset]
    levels = _level_ids(result)
    lines = ["| type | " + " | ".join(f"L{lv}" for lv in levels) + " |",
             "|---|" + "|".join(["---:"] * len(levels)) + "|"]
    for tkey, t in result["types"].items():
        got = entry["types"][tkey]["levels"]
        cells = [result_files.fmt(got[lv]["mean_abs_prob_change"]) if lv in got else ""
                 for lv in levels]
        lines.append(f"| {tkey} ({result_files.md_escape(t['name'])}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def alarm_table(result: Mapping[str, Any], dataset: str, key: str) -> str:
    """Type x level table of the realised rate `key` ('alarm_fpr', 'alarm_tpr') at the
    validation threshold, the clean value in the header."""
    entry = result["datasets"][dataset]
    levels = _level_ids(result)
    pct = result_files.pct
    lines = [f"| type (clean {pct(entry['clean'].get(key))}) | "
             + " | ".join(f"L{lv}" for lv in levels) + " |",
             "|---|" + "|".join(["---:"] * len(levels)) + "|"]
    for tkey, t in result["types"].items():
        got = entry["types"][tkey]["levels"]
        cells = [pct(got[lv].get(key)) if lv in got else "" for lv in levels]
        lines.append(f"| {tkey} ({result_files.md_escape(t['name'])}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def param_table(result: Mapping[str, Any]) -> str:
    levels = _level_ids(result)
    lines = ["| type | parameter | " + " | ".join(f"L{lv}" for lv in levels) + " |",
             "|---|---|" + "|".join(["---:"] * len(levels)) + "|"]
    for tkey, t in result["types"].items():
        cells = [_flag(t["levels"][lv]["param"], t["levels"][lv]) if lv in t["levels"] else ""
                 for lv in levels]
        lines.append(f"| {tkey} ({result_files.md_escape(t['name'])}) | "
                     f"{result_files.md_escape(t['param_name'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(result: Mapping[str, Any], chart: str | None = ROBUSTNESS_PNG) -> str:
    s = result["settings"]
    md = [f"# Robustness: {result['title']}", "",
          f"Protocol `{result['protocol']}`, seed {s['seed']} (block positions and noise; the "
          "same seed gives identical pixels). Reproduce with `python -m fmsd_jax.main --mode "
          "robustness --config <the run's config> --workdir <the run>`.", "",
          "Where the perturbations act:", ""]
    md += [f"- **{src}**: {text}" for src, text in result["where_applied"].items()]
    md += ["", "Frame AUC ranks single frames, video AUC ranks videos by their mean frame "
           "probability; they are in separate tables and must not be compared with each other. "
           f"`*`: the level lies inside the training augmentation's range "
           f"({result['augmentation']}), so it is not an unseen perturbation for this model. "
           "`=`: the level leaves the image unchanged; it is left out of the means. A type's "
           "mean is over its levels; the overall mean is the mean of the type means.", "",
           "## Levels", "", param_table(result)]
    for name, entry in result["datasets"].items():
        c = entry["clean"]
        md += [f"## {result_files.md_escape(name)}", "",
               f"{c['num_frames']} frames, {c['num_videos']} videos. Clean: frame AUC "
               f"{result_files.fmt(c['frame_auc'])}, "
               f"video AUC {result_files.fmt(c['video_auc'])}.", ""]
        for key in AUC_KEYS:
            md += [f"### {LEVEL_NAME[key]}", "", type_table(result, name, key)]
        md += ["### Mean |Δ p(fake)| against the clean pass", "",
               "How far each frame's probability moved (0 means the perturbation did not reach "
               "the model, or did not matter to it).", "", change_table(result, name)]
        cal = result.get("calibration") or {}
        if cal.get("alarm_point") and "alarm_fpr" in c:
            md += [f"### False alarms and detections at the validation {cal['alarm_point']} "
                   "threshold", "",
                   f"Calibrated P(fake) (T = {cal['temperature']:.4g}) >= "
                   f"{cal['alarm_threshold']:.4g}, the frame threshold chosen on the "
                   f"{result_files.md_escape(str(cal['fitted_on'].get('split')))} split: the "
                   "share of real frames flagged (FPR) and of fake frames caught (TPR) under "
                   "each level.", "", "FPR:", "", alarm_table(result, name, "alarm_fpr"),
                   "TPR:", "", alarm_table(result, name, "alarm_tpr")]
    if chart:
        md += ["## Chart", "", f"AUC against severity, one line per type, clean AUC dashed: "
               f"[{chart}]({chart})", "", f"![robustness]({chart})", ""]
    t = result.get("timing")
    if t:
        load = t["load_average"]
        md += ["## Time", "",
               f"{t['evaluations']} evaluations in {t['seconds']:.1f}s (the first, which compiles "
               f"the model step, {t['first_evaluation_seconds']:.1f}s; the others "
               f"{t['seconds_per_evaluation']:.2f}s each) on {t['backend']}, {t['cpus']} CPUs, "
               f"1-min load average {load['start'][0]:.1f} at start and {load['end'][0]:.1f} at "
               "the end (a shared machine is slower).", ""]
    return "\n".join(md)


def plot(result: Mapping[str, Any], path: str | os.PathLike[str], *,
         workdir: str | os.PathLike[str] | None = None) -> Path:
    """`figure` saved at `path` (robustness.png, or robustness-N.png beside another grid)."""
    return plots.save_figure(figure(result, workdir=workdir), path)


def figure(result: Mapping[str, Any], *, workdir: str | os.PathLike[str] | None = None
           ) -> Figure:
    """Rows: datasets; columns: frame AUC, video AUC; x: severity level; one line per type.

    The title names the method (the result's ``regime``) and the run (``workdir``), since the
    charts of several rows are compared side by side; the clean AUC is in each panel's title
    (a label on the line sat on the level-1 markers); the key under the panels spells out each
    type's abbreviation and the parameter its levels step through."""
    names = list(result["datasets"])
    train = result.get("train_families") or ()
    fig = Figure(figsize=(10.0, 3.3 * len(names) + 1.4), layout="constrained")
    levels = [int(lv) for lv in _level_ids(result)]
    for row, name in enumerate(names):
        entry = result["datasets"][name]
        for col, key in enumerate(AUC_KEYS):
            ax = fig.add_subplot(len(names), 2, 2 * row + col + 1)
            clean = entry["clean"][key]
            if clean is not None:
                ax.axhline(clean, color="k", linestyle="--", linewidth=1.2,
                           label="clean (no perturbation)")
            ax.axhline(0.5, color="0.7", linewidth=0.8, label="chance (0.5)")
            for tkey, got in entry["types"].items():
                lv = sorted(got["levels"], key=int)
                ys = [np.nan if got["levels"][v][key] is None else got["levels"][v][key]
                      for v in lv]
                ax.plot([int(v) for v in lv], ys, marker="o", linewidth=1.4,
                        label=_type_key(tkey, result["types"][tkey]))
            ax.set_xticks(levels)
            ax.set_xlabel("severity level")
            ax.set_ylabel(LEVEL_NAME[key])
            ax.set_ylim(0, 1.02)
            clean_text = "n/a" if clean is None else f"{clean:.3f}"
            mark = " (training family)" if name in train else ""
            ax.set_title(f"{name}{mark}: {_LOWER[key]} (clean {clean_text})", fontsize=10)
            ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2,
               fontsize=plots.SMALL_FONT, frameon=False)
    regime = result.get("regime")
    head = f"Robustness: {result_files.run_title(regime, workdir)} — " if regime else ""
    fig.suptitle(head + result["title"])
    return fig


def _type_key(key: str, t: Mapping[str, Any]) -> str:
    """``GB: Gaussian blur, kernel (σ = k/6) 7 → 21``: what the abbreviation stands for and
    what its levels 1..n set, so the chart reads without robustness.md."""
    params = [lv["param"] for _, lv in sorted(t["levels"].items(), key=lambda kv: int(kv[0]))]
    span = f"{params[0]} → {params[-1]}" if len(params) > 1 else params[0]
    return f"{key}: {t['name']}, {t['param_name']} {span}"
