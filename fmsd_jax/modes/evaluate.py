"""Evaluation by DeepfakeBench's protocol: per test dataset, frame- and video-level metrics.

`--mode evaluate` needs nothing but the workdir and the pretrained weights its config names: the
module structure is rebuilt from those (the mask, decomposition spec and tail triplets from the
checkpoint itself, no SVD) and the trained leaves are restored from the best-on-validation
checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import ml_collections as mlc
import numpy as np

from fmsd_jax import parallel
from fmsd_jax.evaluators import (
    calibration,
    decision,
    metrics,
    operating_points,
    plots,
    result_files,
    scoring,
    subspace_report,
    subspaces,
)
from fmsd_jax.run import manifest, preflight, rebuild, workdir_files

log = logging.getLogger("fmsd_jax")


def evaluate(cfg: mlc.ConfigDict, workdir: str | Path, run=None, trainable=None,
             overwrite: bool = False, checkpoint: tuple[str, int] | None = None) -> dict:
    """Fit the decision rule on validation, then score every test dataset; write
    decision.json, results.json, results.md, ROC curves and reliability diagrams.

    The temperature and the operating points (evaluators/decision.py) come from the
    validation split of the training datasets, scored with the same checkpoint; each test set
    is then scored once, uncalibrated: DeepfakeBench's metrics come from that softmax, as
    DeepfakeBench computes them, and the calibrated P(fake) that calibration and operating
    points are measured on is sigmoid(margin / T) of the same pass (T rescales the margin;
    it changes no frame's rank nor any decision at 0.5). An FMSD run with K > 1 then scores
    each set once more under every variant of the subspace ablation (evaluators/subspaces.py:
    each subspace's training undone, and only it trained), written to results.md and
    subspaces.png.

    results.md also shows the backbone's contribution from the run's diagnostics.json (written
    by training; see fmsd_jax/evaluators/adaptation.py) when that file is there. `--mode evaluate`
    replaces the run's own results (and says so), but not files that another report points
    at (a demo row's, which the demo's report.md shows) unless `overwrite`.
    """
    workdir = Path(workdir)
    mode = "train" if run is not None else "evaluate"  # train passes its run in
    if run is None:
        if not overwrite:
            result_files.refuse_replacing_reported(
                [workdir / n for n in (workdir_files.RESULTS_JSON, workdir_files.RESULTS_MD,
                                       workdir_files.ROC_PNG)],
                own=[workdir / workdir_files.RESULTS_MD], what="--mode evaluate",
                allow="--overwrite")
        preflight.check_config(cfg)
        decision.check_config(cfg)
        data = preflight.check_data(cfg, "evaluate")
        manifest.warn_if_data_changed(workdir, data)
        mesh = parallel.make_mesh(cfg.mesh)
        parallel.check_batch_fits(mesh, cfg.eval.batch_size, "config.eval.batch_size")
        run = rebuild.open_run(cfg, workdir, mesh, estimate=False)
    if trainable is None:
        trainable, step, which = rebuild.restore_for_eval(cfg, workdir, run, "evaluating")
        checkpoint = (which, step)
    if mode == "evaluate":  # after the restore: a workdir that was never trained stays as is
        manifest.record(workdir, "evaluate", data)
    which, step = checkpoint or (None, None)
    predict = scoring.make_predict_fn(run.graphdef, run.mesh)
    rule = decision.fit_on_validation(cfg, run, trainable, predict, checkpoint=which, step=step)
    decision.save(workdir, rule)
    skip = subspaces.skip_reason(run)
    variants = subspaces.ablations(run, trainable) if skip is None else None
    results, curves, video_curves, reliability = {}, {}, {}, {}
    for name in cfg.data.test_dataset:
        acc = scoring.score_split(cfg, run, trainable, name, "test", predict)
        result, (probs, labels), vids = acc.result(), acc.arrays(), acc.video_ids()
        result.update(decision_numbers(rule, acc))
        result["subspaces"] = subspaces.subspace_ablation(cfg, run, trainable, predict, name,
                                                          variants=variants)
        results[name] = result
        reliability[name] = result["calibration"].pop("reliability")
        if len(np.unique(labels)) == 2:
            curves[name] = metrics.roc(probs, labels, name=name)
            if vids is not None:  # the per-video mean probabilities video AUC ranks
                vp, vy, _ = metrics.aggregate_by_video(probs, labels, vids)
                if len(np.unique(vy)) == 2:
                    video_curves[name] = metrics.roc(vp, vy, name=f"{name} (video level)")
        log.info("%s: %s", name, " ".join(
            f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
        _log_decision(name, result)
    if jax.process_index() == 0:
        diag = workdir / workdir_files.DIAGNOSTICS_JSON
        train_families = list(cfg.data.train_dataset)
        title = result_files.run_title(cfg.method.regime, workdir)
        ablation = {n: r["subspaces"] for n, r in results.items()}
        result_files.write_results(
            workdir, results, notes=[manifest.citation(workdir, mode)],
            diagnostics=json.loads(diag.read_text()) if diag.is_file() else None,
            train_families=train_families, decision=rule.to_json(),
            sections=[subspace_report.subspace_markdown(ablation)])
        if curves:
            plots.plot_roc(curves, workdir / workdir_files.ROC_PNG,
                           video_curves=video_curves or None, title=f"ROC: {title}",
                           train_families=train_families)
        if skip is None:
            subspace_report.plot_subspaces(ablation, workdir / workdir_files.SUBSPACES_PNG)
        plots.plot_reliability(reliability, workdir / workdir_files.CALIBRATION_PNG,
                               temperature=rule.temperature,
                               title=f"Reliability of P(fake): {title}")
    return results


def decision_numbers(rule: decision.Decision, acc: metrics.MetricAccumulator) -> dict:
    """One test set's calibration (before / after T), operating points (validation-chosen
    thresholds against the oracle, frame and video level) and video AUC per aggregation."""
    probs, labels = acc.arrays()
    margins, vids = acc.logits(), acc.video_ids()
    calibrated = calibration.probs_at(margins, rule.temperature)
    out = {"calibration": {
        "temperature": rule.temperature,
        "before": calibration.summary(probs, labels),
        "after": calibration.summary(calibrated, labels),
        "reliability": {"before": calibration.reliability(probs, labels),
                        "after": calibration.reliability(calibrated, labels)}}}
    points = {"frame": operating_points.measure(calibrated, labels,
                                                rule.thresholds.get("frame"))}
    if vids is not None:
        vp, vy, _ = metrics.aggregate_by_video(calibrated, labels, vids, how=rule.aggregation,
                                               topk=rule.topk)
        points["video"] = operating_points.measure(vp, vy, rule.thresholds.get("video"))
        out["video_auc_by_aggregation"] = metrics.video_auc_by_aggregation(
            probs, labels, vids, topk=rule.topk, name=acc.name)
    out["operating_points"] = {level: p for level, p in points.items() if p}
    return out


def _log_decision(name: str, result: dict) -> None:
    c = result["calibration"]
    log.info("%s: ECE %.4f -> %.4f, Brier %.4f -> %.4f, NLL %.4f -> %.4f (T = %.4f)", name,
             c["before"]["ece"], c["after"]["ece"], c["before"]["brier"], c["after"]["brier"],
             c["before"]["nll"], c["after"]["nll"], c["temperature"])
    for level, points in result["operating_points"].items():
        log.info("%s: %s level at validation thresholds: %s", name, level, "; ".join(
            f"{n} TPR {p['tpr']:.4f} FPR {p['fpr']:.4f} (oracle TPR {p['oracle_tpr']:.4f})"
            for n, p in points.items()))
