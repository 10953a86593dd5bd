"""The demo's learning-rate sweep: each method at a few learning rates, chosen on
SynBlend validation, written to ROOT/sweep/sweep.json and sweep.md."""

from __future__ import annotations

import logging
import math
import os
import shlex
import time
from pathlib import Path
from typing import Any

import ml_collections as mlc

from fmsd_jax import atomic
from fmsd_jax.demo import SWEEP_DIR, SWEEP_JSON, report
from fmsd_jax.demo.rows import (
    CONFIG_FILE,
    ROW_NAMES,
    contribution,
    method_config,
    overrides,
    prepare_backbone,
    prepare_data,
    row_paths,
    same_config,
)

log = logging.getLogger("fmsd_jax")


def sweep_config(cfg: mlc.ConfigDict, method: str, lr: float, data_dir: Path,
                 pretrained_dir: Path) -> mlc.ConfigDict:
    """One grid point: the row's training config at backbone lr `lr`, with no test set at all,
    so a sweep cannot look at a held-out family even by accident (nothing is evaluated after
    training; only the validation split of the training family is ever scored)."""
    sub = method_config(cfg, method, data_dir, pretrained_dir)
    with sub.unlocked():
        sub.optim.lr = float(lr)
        sub.data.test_dataset = ()
        sub.train.eval_after_training = False
    return sub


def best_validation(subdir: Path, select_metric: str) -> dict[str, Any] | None:
    """{'step', metrics...} of the best-on-validation checkpoint of a finished run, else None."""
    from fmsd_jax.run import checkpoints

    ckpts = checkpoints.RunCheckpoints(subdir, select_metric=select_metric)
    try:
        step = ckpts.best.best_step()
        metrics = ckpts.best.metrics(step) if step is not None else None
    finally:
        ckpts.close()
    if step is None or not metrics:
        return None
    return {"step": int(step), **{k: float(v) for k, v in metrics.items()}}


def run_sweep(cfg: mlc.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Train every (method, backbone lr) of `demo.sweep` and pick each method's lr by its best
    SynBlend *validation* frame AUC (the checkpoint-selection metric; the first grid value wins
    a tie), the same procedure for every method. Head lr stays each method's `demo.optim`
    value. Runs go to WORKDIR/sweep/<method>_lr<lr>/ next to the demo's data/ and pretrained/
    (made if missing, shared with the demo), finished points are skipped, and the table is
    printed and written to WORKDIR/sweep/sweep.json and sweep.md."""
    from fmsd_jax.modes import train
    from fmsd_jax.run import checkpoints

    workdir = Path(workdir)
    data_dir, pretrained_dir = row_paths(cfg, workdir)
    prepare_data(cfg, data_dir)
    prepare_backbone(cfg, pretrained_dir)
    out_dir = workdir / SWEEP_DIR
    metric = cfg.eval.select_metric
    points: list[dict[str, Any]] = []
    for method in cfg.demo.sweep.methods:
        for lr in cfg.demo.sweep.lrs:
            sub = sweep_config(cfg, method, lr, data_dir, pretrained_dir)
            subdir = out_dir / f"{method}_lr{lr:g}"
            done = (same_config(sub, subdir)
                    and checkpoints.latest_saved_step(subdir) == sub.train.total_steps)
            best = best_validation(subdir, metric) if done else None
            seconds, cpu = 0.0, 0.0
            if best is None:  # not started, or interrupted: train.train resumes it
                log.info("=== sweep: %s at lr %g → %s", ROW_NAMES[method], lr, subdir)
                t, c = time.perf_counter(), time.process_time()
                train.train(sub, subdir)
                seconds, cpu = time.perf_counter() - t, time.process_time() - c
                best = best_validation(subdir, metric)
            if best is None:
                raise RuntimeError(f"{subdir}: training finished without a validation score; "
                                   "is config.train.eval_every > config.train.total_steps?")
            points.append({"method": method, "lr": float(lr), "head_lr": float(sub.optim.head_lr),
                           "best": best, **contribution(subdir), "seconds": seconds,
                           "cpu_seconds": cpu, "load": round(os.getloadavg()[0], 2)})
    chosen = choose_learning_rates(points, metric)
    table = report.sweep_table(points, chosen, metric=metric)
    record = {"metric": metric, "split": cfg.eval.splits_from_train,
              "train_dataset": list(cfg.data.train_dataset), "grid": list(cfg.demo.sweep.lrs),
              "steps": int(cfg.train.total_steps), "points": points, "chosen": chosen,
              "command": sweep_command(cfg, workdir)}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out_dir / SWEEP_JSON, record, sort_keys=False)
    atomic.write_text(out_dir / "sweep.md", f"{record['command']}\n\n{table}")
    print(table, flush=True)
    log.info("sweep: chosen backbone lr %s (written to %s)",
             ", ".join(f"{m} {lr:g}" for m, lr in chosen.items()), out_dir / SWEEP_JSON)
    return {"points": points, "chosen": chosen, "table": table}


def choose_learning_rates(points: list[dict[str, Any]], metric: str) -> dict[str, float]:
    """Per method, the lr of the highest validation `metric`; ties go to the earlier point."""
    chosen: dict[str, tuple[float, float]] = {}
    for p in points:
        score = p["best"].get(metric, math.nan)
        if not math.isfinite(score):
            continue
        if p["method"] not in chosen or score > chosen[p["method"]][1]:
            chosen[p["method"]] = (p["lr"], score)
    return {m: lr for m, (lr, _) in chosen.items()}


def sweep_command(cfg: mlc.ConfigDict, workdir: Path) -> str:
    arg = ",".join(filter(None, [cfg.demo.variant, "sweep"]))
    return " ".join(["python -m fmsd_jax.main", f"--config {CONFIG_FILE}:{arg}",
                     f"--workdir {shlex.quote(str(workdir))}", *overrides(cfg)])
