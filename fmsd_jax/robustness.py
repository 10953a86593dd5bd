"""`--mode robustness`: a trained run scored on every test set, clean and under each
perturbation at each severity, with tables and a chart.

The perturbations (``fmsd_jax.data.perturbations``) run inside the evaluation input pipeline, in
its host workers, and the model step is evaluation's own jitted predict function, compiled once
for the whole protocol: a protocol of T types × L levels costs T·L + 1 ordinary evaluations.

Outputs in the workdir (process 0): ``robustness.json`` (every number), ``robustness.md``
(per test set a type × level table of frame AUC and a separate one of video AUC; levels inside
the training augmentation's range are flagged, since for this model they are not unseen), and
``robustness.png`` (AUC against severity, one line per type, the clean AUC marked).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from matplotlib.figure import Figure

from fmsd_jax import atomic, build, evaluate, report, sharding
from fmsd_jax.data import perturbations as pt
from fmsd_jax.data import pipeline
from fmsd_jax.errors import BadInput

log = logging.getLogger("fmsd_jax")

ROBUSTNESS = "robustness"  # the outputs' stem; another grid goes beside as robustness-N
ROBUSTNESS_JSON = f"{ROBUSTNESS}.json"
ROBUSTNESS_MD = f"{ROBUSTNESS}.md"
ROBUSTNESS_PNG = f"{ROBUSTNESS}.png"
_KEYS = ("frame_auc", "video_auc")
_LEVEL_NAME = {"frame_auc": "Frame AUC", "video_auc": "Video AUC"}
_LOWER = {"frame_auc": "frame AUC", "video_auc": "video AUC"}
TITLES = {"deeperforensics": "DeeperForensics-1.0 perturbations",
          "gend": "GenD's image-level perturbation grid"}


def plan(cfg: mlc.ConfigDict) -> list[pt.Perturbation]:
    """The (type, level) evaluations the config asks for, checked before any work is spent."""
    r = cfg.robustness
    if r.protocol not in pt.PROTOCOLS:
        raise BadInput(f"config.robustness.protocol={r.protocol!r}; expected one of "
                         f"{sorted(pt.PROTOCOLS)}")
    table = pt.PROTOCOLS[r.protocol]
    keys = list(r.types) or list(table)
    unknown = [k for k in keys if k not in table]
    if unknown:
        raise BadInput(f"config.robustness.types: {unknown} not in protocol {r.protocol!r}, "
                         f"whose types are {list(table)}")
    out = []
    for key in keys:
        n = len(table[key].params)
        levels = [int(v) for v in r.levels] or list(range(1, n + 1))
        bad = [v for v in levels if not 1 <= v <= n]
        if bad:
            raise BadInput(f"config.robustness.levels: {bad} out of range for type {key!r} "
                             f"of protocol {r.protocol!r} (levels 1..{n})")
        out += [pt.Perturbation(r.protocol, key, v, int(r.seed)) for v in levels]
    return out


def settings(cfg: mlc.ConfigDict) -> dict[str, Any]:
    """What determines the numbers besides the checkpoint (stored, and compared on reuse)."""
    r = cfg.robustness
    items = plan(cfg)
    return {"protocol": r.protocol, "types": list(dict.fromkeys(p.key for p in items)),
            "levels": sorted({p.level for p in items}), "seed": int(r.seed),
            "datasets": list(r.datasets or cfg.data.test_dataset)}


def robustness(cfg: mlc.ConfigDict, workdir: str | Path, run=None) -> dict[str, Any]:
    """Score every robustness dataset clean and perturbed; write the three outputs."""
    workdir = Path(workdir)
    items = plan(cfg)
    datasets = list(cfg.robustness.datasets or cfg.data.test_dataset)
    missing = [d for d in datasets if not pipeline.has_split(cfg.data, d, "test")]
    if missing:
        raise BadInput(f"robustness datasets {missing} have no 'test' split; fix "
                         "config.robustness.datasets (empty: data.test_dataset)")
    if run is None:
        mesh = sharding.make_mesh(cfg.mesh)
        sharding.check_batch_fits(mesh, cfg.eval.batch_size, "config.eval.batch_size")
        run = build.prepare(cfg, workdir, mesh, estimate=False)
    stem = output_stem(cfg, workdir) if jax.process_index() == 0 else ROBUSTNESS
    try:
        result = _measure(cfg, workdir, run, items, datasets)
    except BaseException:
        if stem != ROBUSTNESS:  # our claim of a new name, never filled
            atomic.release_unfilled(workdir / f"{stem}.json")
        raise
    if jax.process_index() == 0:
        js, _, _ = write_outputs(workdir, result, stem)
        log.info("robustness: wrote %s and its .md and .png", js)
    return result


def output_stem(cfg: mlc.ConfigDict, workdir: Path) -> str:
    """The outputs' name: `robustness` when free, or when it holds this same measurement
    (settings equal) and no other report points at it; else the first free `robustness-N`,
    claimed now, so that an earlier grid (a demo row's, which the demo's report.md shows) is
    never replaced by another one."""
    own, own_md, own_png = (workdir / n for n in (ROBUSTNESS_JSON, ROBUSTNESS_MD, ROBUSTNESS_PNG))
    if not own.exists():
        return ROBUSTNESS
    found = load_if_current(cfg, workdir)
    if found is not None and found[1] == ROBUSTNESS and not any(
            report.reports_pointing_at(p, own=[own_md]) for p in (own, own_md, own_png)):
        return ROBUSTNESS
    stem = atomic.claim_free_name(own).stem
    log.info("robustness: %s holds another grid (or a report points at it); writing %s.* "
             "beside it", own.name, stem)
    return stem


def _measure(cfg: mlc.ConfigDict, workdir: Path, run, items: list[pt.Perturbation],
             datasets: list[str]) -> dict[str, Any]:
    """Every dataset clean and under every perturbation: the robustness.json structure."""
    trainable = build.restore_trainable(cfg, workdir, run)
    predict = evaluate.make_predict_fn(run.graphdef, run.mesh)
    # The clean pass checks the frame files; the perturbed passes read the same ones.
    unchecked = copy.deepcopy(cfg)
    unchecked.data.check_files = False

    total = len(datasets) * (1 + len(items))
    done, t_start, load_start = 0, time.perf_counter(), os.getloadavg()
    first = 0.0  # the first evaluation includes compiling the predict step: not in the ETA
    log.info("robustness: %s, %d types, %d evaluations of %s", cfg.robustness.protocol,
             len({p.key for p in items}), total, ", ".join(datasets))

    def progress(what: str, res: Mapping[str, Any]) -> None:
        nonlocal done, first
        done += 1
        elapsed = time.perf_counter() - t_start
        first = first or elapsed
        eta = ((elapsed - first) / (done - 1) if done > 1 else elapsed) * (total - done)
        moved = res.get("mean_abs_prob_change")
        log.info("robustness [%d/%d] %s: frame AUC %s video AUC %s%s (%.1fs elapsed, ETA %.0fs)",
                 done, total, what, report._fmt(res["frame_auc"]), report._fmt(res["video_auc"]),
                 "" if moved is None else f" mean |Δp(fake)| {moved:.4f}", elapsed, eta)

    clean: dict[str, dict] = {}
    scores: dict[str, dict[tuple[str, int], dict]] = {}
    for name in datasets:
        clean[name], clean_probs, _ = evaluate.score_dataset(cfg, run, trainable, name, "test",
                                                             predict)
        progress(f"{name} clean", clean[name])
        scores[name] = {}
        for p in items:
            res, probs, _ = evaluate.score_dataset(unchecked, run, trainable, name, "test",
                                                   predict, reader_wrapper=pt.reader_wrapper(p))
            # Evidence that the perturbation reached the model: how far p(fake) moved.
            res = {**res, "mean_abs_prob_change": float(np.mean(np.abs(probs - clean_probs)))
                   if len(probs) == len(clean_probs) and len(probs) else None}
            scores[name][(p.key, p.level)] = res
            progress(f"{name} {p.key} level {p.level} ({p.spec.param_name} = "
                     f"{p.spec.label(p.level)})", res)
    seconds = time.perf_counter() - t_start
    result = summarise(cfg, clean, scores)
    result["timing"] = {"evaluations": total, "seconds": seconds,
                        "first_evaluation_seconds": first,  # includes compiling the step
                        "seconds_per_evaluation": (seconds - first) / max(total - 1, 1),
                        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
                        "cpus": os.cpu_count(), "backend": jax.default_backend()}
    log.info("robustness: %d evaluations in %.1fs (the first, with compilation, %.1fs; the "
             "others %.2fs each)", total, seconds, first,
             result["timing"]["seconds_per_evaluation"])
    return result


# ----------------------------------------------------------------------------------------------
# Numbers → result


def _auc(res: Mapping[str, Any]) -> dict[str, float | None]:
    return {k: _json_float(res.get(k)) for k in _KEYS}


def _json_float(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _mean(values: Sequence[float | None]) -> float | None:
    m, n = report._nanmean([math.nan if v is None else v for v in values])
    return m if n else None


def summarise(cfg: mlc.ConfigDict, clean: Mapping[str, Mapping],
              scores: Mapping[str, Mapping[tuple[str, int], Mapping]]) -> dict[str, Any]:
    """The robustness.json structure from per-evaluation metric dicts.

    Per-type means are over the evaluated levels that change the image (GenD's identity levels,
    e.g. blur (0, 0), repeat the clean score and are left out); the overall mean is the mean of
    the per-type means. Levels inside the training augmentation's range are flagged, not
    dropped: the papers' per-type means include them. ``regime`` and ``train_families`` are
    for the chart's titles (the method, and which test set is a training family)."""
    proto = cfg.robustness.protocol
    items = plan(cfg)
    aug = cfg.data.get("augment")
    types: dict[str, Any] = {}
    for p in items:
        t = types.setdefault(p.key, {"name": p.spec.name, "param_name": p.spec.param_name,
                                     "video": p.spec.video, "levels": {}})
        t["levels"][str(p.level)] = {
            "param": p.spec.label(p.level),
            "seen_in_training": pt.seen_in_training(proto, p.key, p.param, aug),
            "identity": pt.is_identity(proto, p.key, p.param)}
    out_sets: dict[str, Any] = {}
    for name, per in scores.items():
        c = clean[name]
        entry: dict[str, Any] = {"clean": {**_auc(c), "num_frames": int(c.get("num_frames", 0)),
                                           "num_videos": int(c.get("num_videos", 0))},
                                 "types": {}}
        for key, t in types.items():
            levels = {lv: {**_auc(per[(key, int(lv))]), "mean_abs_prob_change": _json_float(
                per[(key, int(lv))].get("mean_abs_prob_change"))} for lv in t["levels"]}
            counted = [lv for lv in levels if not t["levels"][lv]["identity"]]
            entry["types"][key] = {
                "levels": levels,
                "mean": {k: _mean([levels[lv][k] for lv in counted]) for k in _KEYS}}
        entry["mean"] = {k: _mean([v["mean"][k] for v in entry["types"].values()])
                         for k in _KEYS}
        out_sets[name] = entry
    return {"protocol": proto, "title": TITLES[proto], "regime": cfg.method.regime,
            "train_families": list(cfg.data.train_dataset), "settings": settings(cfg),
            "where_applied": pt.WHERE_APPLIED[proto], "types": types,
            "augmentation": _augmentation_text(aug), "datasets": out_sets}


def _augmentation_text(aug) -> str:
    if aug is None or not aug.enabled:
        return "training augmentation off"
    parts = []
    if aug.quality_prob > 0:
        parts.append(f"JPEG quality {aug.quality_lower}–{aug.quality_upper}")
    if aug.blur_prob > 0:
        parts.append(f"Gaussian blur kernel {aug.blur_limit[0]}–{aug.blur_limit[1]}")
    return ", ".join(parts) or "no JPEG or blur augmentation"


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
        cells = [f"{tkey} ({report._md_escape(t['name'])})", report._fmt(entry["clean"][key])]
        cells += [_flag(report._fmt(got["levels"][lv][key]), t["levels"][lv])
                  if lv in got["levels"] else ""
                  for lv in levels]
        cells.append(report._fmt(got["mean"][key]))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| **mean over types** | " + " | ".join([""] * (len(levels) + 1))
                 + f" | **{report._fmt(entry['mean'][key])}** |")
    return "\n".join(lines) + "\n"


def change_table(result: Mapping[str, Any], dataset: str) -> str:
    entry = result["datasets"][dataset]
    levels = _level_ids(result)
    lines = ["| type | " + " | ".join(f"L{lv}" for lv in levels) + " |",
             "|---|" + "|".join(["---:"] * len(levels)) + "|"]
    for tkey, t in result["types"].items():
        got = entry["types"][tkey]["levels"]
        cells = [report._fmt(got[lv]["mean_abs_prob_change"]) if lv in got else ""
                 for lv in levels]
        lines.append(f"| {tkey} ({report._md_escape(t['name'])}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def param_table(result: Mapping[str, Any]) -> str:
    levels = _level_ids(result)
    lines = ["| type | parameter | " + " | ".join(f"L{lv}" for lv in levels) + " |",
             "|---|---|" + "|".join(["---:"] * len(levels)) + "|"]
    for tkey, t in result["types"].items():
        cells = [_flag(t["levels"][lv]["param"], t["levels"][lv]) if lv in t["levels"] else ""
                 for lv in levels]
        lines.append(f"| {tkey} ({report._md_escape(t['name'])}) | "
                     f"{report._md_escape(t['param_name'])} | " + " | ".join(cells) + " |")
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
        md += [f"## {report._md_escape(name)}", "",
               f"{c['num_frames']} frames, {c['num_videos']} videos. Clean: frame AUC "
               f"{report._fmt(c['frame_auc'])}, video AUC {report._fmt(c['video_auc'])}.", ""]
        for key in _KEYS:
            md += [f"### {_LEVEL_NAME[key]}", "", type_table(result, name, key)]
        md += ["### Mean |Δ p(fake)| against the clean pass", "",
               "How far each frame's probability moved (0 means the perturbation did not reach "
               "the model, or did not matter to it).", "", change_table(result, name)]
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
    return report._save(figure(result, workdir=workdir), path)


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
        for col, key in enumerate(_KEYS):
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
            ax.set_ylabel(_LEVEL_NAME[key])
            ax.set_ylim(0, 1.02)
            clean_text = "n/a" if clean is None else f"{clean:.3f}"
            mark = " (training family)" if name in train else ""
            ax.set_title(f"{name}{mark}: {_LOWER[key]} (clean {clean_text})", fontsize=10)
            ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2,
               fontsize=report.SMALL_FONT, frameon=False)
    regime = result.get("regime")
    head = f"Robustness: {report.run_title(regime, workdir)} — " if regime else ""
    fig.suptitle(head + result["title"])
    return fig


def _type_key(key: str, t: Mapping[str, Any]) -> str:
    """``GB: Gaussian blur, kernel (σ = k/6) 7 → 21``: what the abbreviation stands for and
    what its levels 1..n set, so the chart reads without robustness.md."""
    params = [lv["param"] for _, lv in sorted(t["levels"].items(), key=lambda kv: int(kv[0]))]
    span = f"{params[0]} → {params[-1]}" if len(params) > 1 else params[0]
    return f"{key}: {t['name']}, {t['param_name']} {span}"


# ----------------------------------------------------------------------------------------------
# The demo's table


def load_if_current(cfg: mlc.ConfigDict, workdir: str | Path) -> tuple[dict, str] | None:
    """(result, stem) of the robustness[-N].json in WORKDIR written with the same settings
    (`robustness` first), else None."""
    found = sorted(Path(workdir).glob(f"{ROBUSTNESS}*.json"),
                   key=lambda p: (p.stem != ROBUSTNESS, len(p.stem), p.stem))
    for path in found:
        if not re.fullmatch(rf"{ROBUSTNESS}(-\d+)?", path.stem) or path.stat().st_size == 0:
            continue
        result = json.loads(path.read_text(encoding="utf-8"))
        if result.get("settings") == settings(cfg):
            return result, path.stem
    return None


def demo_section(family: str, rows: Mapping[str, tuple[mlc.ConfigDict, Path]],
                 levels: Sequence[int] = ()) -> str:
    """The demo's robustness section: every row (name → (its config, its trained workdir))
    evaluated on one held-out `family` at `levels` (empty: all); per-type means and the overall
    mean, frame and video in separate tables. A row whose robustness[-N].json has the same
    settings is not rerun; the section names each row's files."""
    results: dict[str, dict] = {}
    files: list[str] = []
    seconds = 0.0
    for name, (cfg, workdir) in rows.items():
        cfg = copy.deepcopy(cfg)
        cfg.robustness.datasets = (family,)
        cfg.robustness.levels = tuple(levels)
        found = load_if_current(cfg, workdir)
        if found is None:
            log.info("=== robustness of %s on %s", name, family)
            seconds += robustness(cfg, workdir)["timing"]["seconds"]
            found = load_if_current(cfg, workdir)
        results[name], stem = found
        files.append(f"{report._md_escape(name)} `{Path(workdir).name}/{stem}.md`, "
                     f"`{Path(workdir).name}/{stem}.png`")
    first = next(iter(results.values()))
    types = list(first["types"])
    levels = first["settings"]["levels"]
    md = ["## Robustness to unseen perturbations", "",
          f"{first['title']}, levels {', '.join(map(str, levels))}, on the held-out family "
          f"**{family}**; each cell is a type's mean over those levels (per-level tables and "
          f"charts: {'; '.join(files)}). "
          + " ".join(f"{src}: {text}." for src, text in first["where_applied"].items()), ""]
    flagged = [f"{k} L{lv}" for k, t in first["types"].items()
               for lv, f in t["levels"].items() if f["seen_in_training"]]
    if flagged:
        md += [f"Inside the training augmentation's range ({first['augmentation']}), so not "
               f"unseen: {', '.join(flagged)}.", ""]
    for key in _KEYS:
        header = ["method", "clean"] + types + ["mean"]
        md += [f"### {_LEVEL_NAME[key]}", "", "| " + " | ".join(header) + " |",
               "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for name, res in results.items():
            e = res["datasets"][family]
            cells = [report._md_escape(name), report._fmt(e["clean"][key])]
            cells += [report._fmt(e["types"][t]["mean"][key]) for t in types]
            cells.append(report._fmt(e["mean"][key]))
            md.append("| " + " | ".join(cells) + " |")
        md.append("")
    evals = sum(r["timing"]["evaluations"] for r in results.values())
    md += [f"{evals} evaluations ({len(results)} rows); {seconds:.0f}s spent in this run "
           "(rows whose results were already there cost nothing).", ""]
    return "\n".join(md)


def append_to_report(path: str | Path, section: str) -> None:
    """Add a section at the end of an existing Markdown report, atomically."""
    path = Path(path)
    atomic.write_text(path, path.read_text(encoding="utf-8").rstrip("\n") + "\n\n"
                              + section)
