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
from fmsd_jax.evaluators import metrics, plots, result_files, scoring
from fmsd_jax.run import manifest, preflight, rebuild, workdir_files

log = logging.getLogger("fmsd_jax")


def evaluate(cfg: mlc.ConfigDict, workdir: str | Path, run=None, trainable=None,
             overwrite: bool = False) -> dict:
    """Score every test dataset; write results.json, results.md and ROC curves.

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
        data = preflight.check_data(cfg, "evaluate")
        manifest.warn_if_data_changed(workdir, data)
        mesh = parallel.make_mesh(cfg.mesh)
        parallel.check_batch_fits(mesh, cfg.eval.batch_size, "config.eval.batch_size")
        run = rebuild.open_run(cfg, workdir, mesh, estimate=False)
    if trainable is None:
        trainable = rebuild.restore_trainable(cfg, workdir, run, "evaluating")
    if mode == "evaluate":  # after the restore: a workdir that was never trained stays as is
        manifest.record(workdir, "evaluate", data)
    predict = scoring.make_predict_fn(run.graphdef, run.mesh)
    results, curves, video_curves = {}, {}, {}
    for name in cfg.data.test_dataset:
        acc = scoring.score_split(cfg, run, trainable, name, "test", predict)
        result, (probs, labels), vids = acc.result(), acc.arrays(), acc.video_ids()
        results[name] = result
        if len(np.unique(labels)) == 2:
            curves[name] = metrics.roc(probs, labels, name=name)
            if vids is not None:  # the per-video mean probabilities video AUC ranks
                vp, vy, _ = metrics.aggregate_by_video(probs, labels, vids)
                if len(np.unique(vy)) == 2:
                    video_curves[name] = metrics.roc(vp, vy, name=f"{name} (video level)")
        log.info("%s: %s", name, " ".join(
            f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    if jax.process_index() == 0:
        diag = workdir / workdir_files.DIAGNOSTICS_JSON
        train_families = list(cfg.data.train_dataset)
        result_files.write_results(
            workdir, results, notes=[manifest.citation(workdir, mode)],
            diagnostics=json.loads(diag.read_text()) if diag.is_file() else None,
            train_families=train_families)
        if curves:
            plots.plot_roc(curves, workdir / workdir_files.ROC_PNG,
                           video_curves=video_curves or None,
                           title=f"ROC: {result_files.run_title(cfg.method.regime, workdir)}",
                           train_families=train_families)
    return results
