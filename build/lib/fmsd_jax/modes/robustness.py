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

from fmsd_jax import atomic, parallel
from fmsd_jax.data import perturbations as pt
from fmsd_jax.data import pipeline
from fmsd_jax.errors import BadInput
from fmsd_jax.evaluators import decision, result_files, scoring
from fmsd_jax.evaluators import operating_points as ops
from fmsd_jax.evaluators.robustness_report import AUC_KEYS, json_float, write_outputs
from fmsd_jax.run import rebuild
from fmsd_jax.run.workdir_files import ROBUSTNESS, ROBUSTNESS_JSON, ROBUSTNESS_MD, ROBUSTNESS_PNG

log = logging.getLogger("fmsd_jax")

# The validation-chosen frame threshold whose false alarms robustness.md follows per level.
ALARM_POINT = "fpr@0.05"
TITLES = {"deeperforensics": "DeeperForensics-1.0 perturbations",
          "gend": "GenD's image-level perturbation grid"}


def perturbation_grid(cfg: mlc.ConfigDict) -> list[pt.Perturbation]:
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
    items = perturbation_grid(cfg)
    return {"protocol": r.protocol, "types": list(dict.fromkeys(p.key for p in items)),
            "levels": sorted({p.level for p in items}), "seed": int(r.seed),
            "datasets": list(r.datasets or cfg.data.test_dataset)}


def robustness(cfg: mlc.ConfigDict, workdir: str | Path, run=None) -> dict[str, Any]:
    """Score every robustness dataset clean and perturbed; write the three outputs."""
    workdir = Path(workdir)
    items = perturbation_grid(cfg)
    datasets = list(cfg.robustness.datasets or cfg.data.test_dataset)
    missing = [d for d in datasets if not pipeline.has_split(cfg.data, d, "test")]
    if missing:
        raise BadInput(f"robustness datasets {missing} have no 'test' split; fix "
                       "config.robustness.datasets (empty: data.test_dataset)")
    if run is None:
        mesh = parallel.make_mesh(cfg.mesh)
        parallel.check_batch_fits(mesh, cfg.eval.batch_size, "config.eval.batch_size")
        run = rebuild.open_run(cfg, workdir, mesh, estimate=False)
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
            result_files.reports_pointing_at(p, own=[own_md]) for p in (own, own_md, own_png)):
        return ROBUSTNESS
    stem = atomic.claim_free_name(own).stem
    log.info("robustness: %s holds another grid (or a report points at it); writing %s.* "
             "beside it", own.name, stem)
    return stem


def _measure(cfg: mlc.ConfigDict, workdir: Path, run, items: list[pt.Perturbation],
             datasets: list[str]) -> dict[str, Any]:
    """Every dataset clean and under every perturbation: the robustness.json structure."""
    trainable = rebuild.restore_trainable(cfg, workdir, run)
    predict = scoring.make_predict_fn(run.graphdef, run.mesh)
    # Calibrated P(fake) (the mean |Δp| is then in the units predict prints), and the frame
    # threshold a deployment would use: how far do its false alarms drift under each level?
    rule = decision.load_decision(workdir)
    t = rule.temperature
    point = ALARM_POINT if ALARM_POINT in rule.available("frame") else None
    if point is None:
        log.warning("robustness: no %s frame threshold (%s): false alarms are not measured",
                    ALARM_POINT, rule.note or "decision.json lacks it")

    def at_threshold(res: dict, probs: np.ndarray, labels: np.ndarray) -> dict:
        if point is None:
            return res
        rates = ops.rates_at(probs, labels, rule.thresholds["frame"][point])
        return {**res, "alarm_tpr": rates["tpr"], "alarm_fpr": rates["fpr"]}
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
                 done, total, what, result_files.fmt(res["frame_auc"]),
                 result_files.fmt(res["video_auc"]),
                 "" if moved is None else f" mean |Δp(fake)| {moved:.4f}", elapsed, eta)

    clean: dict[str, dict] = {}
    scores: dict[str, dict[tuple[str, int], dict]] = {}
    for name in datasets:
        res, clean_probs, labels = scoring.score_dataset(cfg, run, trainable, name, "test",
                                                         predict, temperature=t)
        clean[name] = at_threshold(res, clean_probs, labels)
        progress(f"{name} clean", clean[name])
        scores[name] = {}
        for p in items:
            res, probs, labels = scoring.score_dataset(
                unchecked, run, trainable, name, "test", predict,
                reader_wrapper=pt.reader_wrapper(p), temperature=t)
            res = at_threshold(res, probs, labels)
            # Evidence that the perturbation reached the model: how far p(fake) moved.
            res = {**res, "mean_abs_prob_change": float(np.mean(np.abs(probs - clean_probs)))
                   if len(probs) == len(clean_probs) and len(probs) else None}
            scores[name][(p.key, p.level)] = res
            progress(f"{name} {p.key} level {p.level} ({p.spec.param_name} = "
                     f"{p.spec.label(p.level)})", res)
    seconds = time.perf_counter() - t_start
    result = summarise(cfg, clean, scores)
    result["calibration"] = {"temperature": t, "alarm_point": point,
                             "alarm_threshold": None if point is None
                             else rule.thresholds["frame"][point],
                             "fitted_on": rule.fitted_on, "note": rule.note}
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
    return {k: json_float(res.get(k)) for k in AUC_KEYS}


def _alarms(res: Mapping[str, Any]) -> dict[str, float | None]:
    return {k: json_float(res[k]) for k in ("alarm_tpr", "alarm_fpr") if k in res}


def _mean(values: Sequence[float | None]) -> float | None:
    m, n = result_files.nanmean([math.nan if v is None else v for v in values])
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
    items = perturbation_grid(cfg)
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
        entry: dict[str, Any] = {"clean": {**_auc(c), **_alarms(c),
                                           "num_frames": int(c.get("num_frames", 0)),
                                           "num_videos": int(c.get("num_videos", 0))},
                                 "types": {}}
        for key, t in types.items():
            levels = {lv: {**_auc(per[(key, int(lv))]), **_alarms(per[(key, int(lv))]),
                           "mean_abs_prob_change": json_float(
                               per[(key, int(lv))].get("mean_abs_prob_change"))}
                      for lv in t["levels"]}
            counted = [lv for lv in levels if not t["levels"][lv]["identity"]]
            entry["types"][key] = {
                "levels": levels,
                "mean": {k: _mean([levels[lv][k] for lv in counted]) for k in AUC_KEYS}}
        entry["mean"] = {k: _mean([v["mean"][k] for v in entry["types"].values()])
                         for k in AUC_KEYS}
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
# A result already on disk (the demo's report reads it)


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
