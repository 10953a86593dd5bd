"""The offline end-to-end demo (`configs/demo.py`): data → pretrained backbone → four methods →
one report.

Why it exists: a newcomer's first command must show the method working with no download and no
GPU. No CLIP weights can be fetched, so the demo makes its own small pretrained backbone by
self-supervised learning on the benchmark's real photographs (`fmsd_jax/demo/pretrain.py`),
writes it
as a Hugging Face CLIP checkpoint and then runs the *regular* pipeline on it
(`modes.train.train` with `model.init_from` pointing at that file), exactly as with real CLIP.

Stages, each skipped when its output is already there (so a rerun, or a row's own command,
only does what is missing):

  WORKDIR/data/         synthetic cross-forgery benchmark (`synthetic.write_benchmark`)
  WORKDIR/pretrained/   SimCLR-pretrained CLIP-shaped tower: model.safetensors, config.json
  WORKDIR/<method>/     one regular training run per method (fmsd, effort, full, linear_probe)
  WORKDIR/report.md     method × family table, verdicts, layer-score chart, ROC curves

`configs/demo.py:method=X --workdir ROOT/X` runs one row (`rows`); its data and backbone are
then read
from ROOT (the workdir's parent) when ROOT holds a prepared demo, so the command printed in the
report reproduces that row against the same backbone; `config.demo.root` names another place.
Without either, the row prepares its own inside its workdir: the demo never writes above the
workdir it was given, and says where it reads and writes before it starts.

Honesty rules (issue 6, item 4): every hyper-parameter is fixed in `configs/demo.py` before any
held-out family is looked at; checkpoints are chosen on the *training* family's validation
split; the verdict against each baseline is computed by `demo.report.compare_to_baselines`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections as mlc

from fmsd_jax import atomic
from fmsd_jax.demo import report, robustness_section, rows, sweep
from fmsd_jax.run import workdir_lock

log = logging.getLogger("fmsd_jax")


class _Clock:
    """Per-stage wall seconds, process CPU seconds (all threads) and the 1-min load average at
    each stage's start: on a shared machine wall time alone says little, and CPU time with
    the load beside it lets a reader re-estimate the wall time of a quiet machine."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.load: dict[str, float] = {}
        self._t0 = time.perf_counter()
        self._c0 = time.process_time()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.load[name] = round(os.getloadavg()[0], 2)
        t, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = time.perf_counter() - t
            self.cpu[name] = time.process_time() - c

    def total(self) -> None:
        self.wall["total"] = time.perf_counter() - self._t0
        self.cpu["total"] = time.process_time() - self._c0


def run(cfg: mlc.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run every missing stage; return {'results', 'timing', 'skipped', 'report'}.

    With `demo.method='all'` the rows go to WORKDIR/<method> and WORKDIR/report.md is written;
    with a single method, WORKDIR is that row's run directory; with `demo.sweep.enabled`
    (`configs/demo.py:sweep`) the learning-rate sweep runs instead (`sweep.run_sweep`). Each row's
    workdir is locked for the whole demo (`workdir_lock`; main locks WORKDIR itself), because
    a row can also be trained by its own command."""
    if cfg.demo.sweep.enabled:
        return sweep.run_sweep(cfg, workdir)
    workdir = Path(workdir)
    with contextlib.ExitStack() as locks:
        if cfg.demo.method == "all":
            import jax

            for method in cfg.demo.methods:
                locks.enter_context(workdir_lock.exclusive(
                    workdir / method, "train", process_index=jax.process_index()))
        return _run(cfg, workdir)


def _run(cfg: mlc.ConfigDict, workdir: Path) -> dict[str, Any]:
    clock = _Clock()
    load_start = os.getloadavg()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir, pretrained_dir = rows.row_paths(cfg, workdir)
    skipped: list[str] = []

    reads_only = rows.reads_prepared_inputs(cfg, workdir)
    if reads_only:
        log.info("reading the benchmark from %s and the backbone from %s (the demo in the "
                 "workdir's parent; --config.demo.root=DIR picks another)", data_dir,
                 pretrained_dir)
    else:
        log.info("writing the benchmark to %s and the backbone to %s, where missing%s",
                 data_dir, pretrained_dir,
                 "" if cfg.demo.root or cfg.demo.method == "all" else
                 " (no prepared demo in the workdir's parent; --config.demo.root=DIR shares "
                 "one between rows)")
    backbone: dict[str, Any] = {"skipped": True}
    with clock.stage("data"):
        if not reads_only:
            rows.prepare_data(cfg, data_dir)
    with clock.stage("pretrain"):
        if not reads_only:
            backbone = rows.prepare_backbone(cfg, pretrained_dir)
    if backbone.get("skipped"):
        skipped.append("pretrain")

    results: dict[str, dict] = {}
    single = cfg.demo.method != "all"
    for method in rows.methods(cfg):
        subdir = workdir if single else workdir / method
        with clock.stage(method):
            res, _, was_skipped = rows.run_row(cfg, method, subdir, data_dir, pretrained_dir)
        results[method] = res
        if was_skipped:
            skipped.append(method)
    section = ""
    if not single and cfg.demo.robustness.family:  # issue 14: one held-out family, every row
        with clock.stage("robustness"):
            section = robustness_section.demo_section(cfg.demo.robustness.family, {
                rows.ROW_NAMES[m]: (rows.method_config(cfg, m, data_dir, pretrained_dir),
                                    workdir / m)
                for m in cfg.demo.methods}, levels=tuple(cfg.demo.robustness.levels))
    clock.total()
    timing = clock.wall
    out: dict[str, Any] = {"results": results, "timing": timing, "skipped": skipped,
                           "report": None}
    if single:
        log.info("row %s done in %.0fs (%s)", cfg.demo.method, timing["total"], workdir)
        return out

    load = {"start": list(load_start), "end": list(os.getloadavg()), "cpus": os.cpu_count(),
            "per_stage_start": clock.load}
    now = {"timing": timing, "cpu_seconds": clock.cpu, "skipped": skipped, "load": load,
           "variant": cfg.demo.variant or "full", "backend": report.backend_name(),
           "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    timing_path = workdir / "demo_timing.json"
    if skipped and timing_path.exists():
        # Keep the timing of the run that did the work; a rerun only adds its own line.
        record = json.loads(timing_path.read_text())
        record["last_rerun"] = now
    else:
        record = now
    atomic.write_json(timing_path, record, sort_keys=False)
    out["report"] = report.write_report(cfg, workdir, results, backbone, record)
    if section:
        robustness_section.append_to_report(out["report"], section)
    log.info("demo finished in %.0fs (%.0f CPU-s, load %.1f → %.1f); report: %s",
             timing["total"], clock.cpu["total"], load_start[0], load["end"][0], out["report"])
    return out
