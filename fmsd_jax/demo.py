"""The offline end-to-end demo (`configs/demo.py`): data → pretrained backbone → four methods →
one report.

Why it exists: a newcomer's first command must show the method working with no download and no
GPU. No CLIP weights can be fetched, so the demo makes its own small pretrained backbone by
self-supervised learning on the benchmark's real photographs (`fmsd_jax.pretrain`), writes it
as a Hugging Face CLIP checkpoint and then runs the *regular* pipeline on it
(`train.train` with `model.init_from` pointing at that file), exactly as with real CLIP.

Stages, each skipped when its output is already there (so a rerun, or a row's own command,
only does what is missing):

  WORKDIR/data/         synthetic cross-forgery benchmark (`synthetic.write_benchmark`)
  WORKDIR/pretrained/   SimCLR-pretrained CLIP-shaped tower: model.safetensors, config.json
  WORKDIR/<method>/     one regular training run per method (fmsd, effort, full, linear_probe)
  WORKDIR/report.md     method × family table, verdicts, layer-score chart, ROC curves

`configs/demo.py:method=X --workdir ROOT/X` runs one row; its data and backbone are then read
from ROOT (the workdir's parent) when ROOT holds a prepared demo, so the command printed in the
report reproduces that row against the same backbone; `config.demo.root` names another place.
Without either, the row prepares its own inside its workdir: the demo never writes above the
workdir it was given, and says where it reads and writes before it starts.

Honesty rules (issue 6, item 4): every hyper-parameter is fixed in `configs/demo.py` before any
held-out family is looked at; checkpoints are chosen on the *training* family's validation
split; the verdict against each baseline is computed by `report.compare_to_baselines`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import math
import os
import shlex
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_collections as mlc

from fmsd_jax import atomic, config_base, report, robustness, workdir_lock
from fmsd_jax.errors import AlreadyExists, BadInput

log = logging.getLogger("fmsd_jax")

METHODS = ("fmsd", "effort", "full", "linear_probe")
# Row names in the report; "FMSD" is ours, the others are baselines.
ROW_NAMES = {m: report.method_name(m) for m in METHODS}
CONFIG_FILE = "configs/demo.py"


# ---------------------------------------------------------------------------------------------
# Paths and per-row configs


def shared_root(cfg: mlc.ConfigDict, workdir: str | os.PathLike) -> Path:
    """Where data/ and pretrained/ live: demo.root when given; WORKDIR for the whole demo.

    A single row (`method=X`) reads them from WORKDIR's parent when that holds a prepared
    demo (runs/demo/effort reads runs/demo/data and runs/demo/pretrained) and the row has none
    of its own; otherwise the row prepares its own inside WORKDIR: a row never writes above
    its workdir."""
    if cfg.demo.root:
        return Path(os.path.expanduser(cfg.demo.root))
    workdir = Path(workdir)
    if cfg.demo.method == "all" or _has_inputs(workdir):
        return workdir
    parent = workdir.absolute().parent
    return parent if _has_inputs(parent) else workdir


def _has_inputs(root: Path) -> bool:
    """Whether ROOT holds what a row reads: the benchmark's JSONs and the backbone."""
    return (root / "data" / "dataset_json").is_dir() and \
        (root / "pretrained" / "model.safetensors").is_file()


def _paths(cfg: mlc.ConfigDict, workdir: str | os.PathLike) -> tuple[Path, Path]:
    root = shared_root(cfg, workdir).absolute()
    return root / "data", root / "pretrained"


def _reads_only(cfg: mlc.ConfigDict, workdir: Path) -> bool:
    """A row that reads a prepared demo above its workdir (and so must not write there)."""
    return not cfg.demo.root and cfg.demo.method != "all" and \
        shared_root(cfg, workdir).absolute() != workdir.absolute()


def method_config(cfg: mlc.ConfigDict, method: str, data_dir: Path,
                  pretrained_dir: Path) -> mlc.ConfigDict:
    """The plain training config of one row: the demo config without its `demo` section,
    the method's regime (`config_base.apply_regime`) and learning rates, and the paths of the
    prepared data and backbone filled in."""
    from fmsd_jax.data.synthetic import data_config_overrides

    if method not in METHODS:
        raise BadInput(f"config.demo.method={method!r}; expected 'all' or one of {METHODS}")
    sub = copy.deepcopy(cfg)
    with sub.unlocked():
        demo = sub.demo
        del sub["demo"]
        sub.method.regime = method
        config_base.apply_regime(sub)
        lrs = demo.optim[method]
        sub.optim.lr = lrs.lr
        sub.optim.head_lr = lrs.head_lr
        sub.model.init_from = str(pretrained_dir / "model.safetensors")
        for k, v in data_config_overrides(data_dir).items():
            sub.data[k] = v
    return sub


def row_config(cfg: mlc.ConfigDict, workdir: str | os.PathLike) -> mlc.ConfigDict:
    """For --mode evaluate/export/predict on one demo row (`configs/demo.py:method=X`)."""
    if cfg.demo.method == "all":
        raise BadInput(
            "this mode works on one trained row; pick it, e.g. "
            f"--config {CONFIG_FILE}:{cfg.demo.variant + ',' if cfg.demo.variant else ''}"
            f"method=fmsd --workdir {Path(workdir) / 'fmsd'}")
    data_dir, pretrained_dir = _paths(cfg, workdir)
    return method_config(cfg, cfg.demo.method, data_dir, pretrained_dir)


# ---------------------------------------------------------------------------------------------
# Stages


def prepare_data(cfg: mlc.ConfigDict, data_dir: Path) -> float:
    """Write the benchmark if missing (write_benchmark is idempotent); returns seconds."""
    from fmsd_jax.data.synthetic import write_benchmark

    t0 = time.perf_counter()
    write_benchmark(data_dir, size=cfg.demo.data_size, seed=cfg.demo.data_seed)
    dt = time.perf_counter() - t0
    log.info("benchmark (%s) ready in %s (%.1fs)", cfg.demo.data_size, data_dir, dt)
    return dt


def prepare_backbone(cfg: mlc.ConfigDict, pretrained_dir: Path) -> dict[str, Any]:
    """Pretrain the tower on the real *train* photographs if missing; the record says how."""
    from fmsd_jax import pretrain
    from fmsd_jax.data.synthetic import real_photos

    pcfg = pretrain.PretrainConfig.from_mapping(cfg.demo.pretrain.to_dict())
    if pcfg.image_size != cfg.model.image_size:
        raise ValueError(f"demo.pretrain.image_size={pcfg.image_size} differs from "
                         f"model.image_size={cfg.model.image_size}; make them equal")
    source = {"photos": "bundled (scikit-image, matplotlib)", "split": "train",
              "seed": int(cfg.demo.data_seed)}
    record_path = pretrained_dir / pretrain.RECORD_JSON
    photos: list = []
    eval_photos: list = []
    if not ((pretrained_dir / pretrain.WEIGHTS).exists() and record_path.exists()):
        photos = real_photos(split="train", seed=cfg.demo.data_seed)
        # Feature-quality check on the validation photos only: nothing here touches a test set.
        eval_photos = real_photos(split="val", seed=cfg.demo.data_seed)
        log.info("pretraining a CLIP-shaped ViT (SimCLR) on %d real train photos", len(photos))
    record = pretrain.pretrain(photos, pcfg, pretrained_dir, eval_photos=eval_photos,
                               source=source)
    return record


def row_is_done(sub: mlc.ConfigDict, subdir: Path) -> dict | None:
    """The results of a finished row, None if it still has to (re)run.

    A row directory trained with a different config is refused rather than mixed with this
    one: its checkpoints would silently resume into a different experiment."""
    if not _same_config(sub, subdir) or not (subdir / report.RESULTS_JSON).exists():
        return None
    results = report.read_results(subdir)
    if not all(name in results for name in sub.data.test_dataset):
        return None
    return results


def _same_config(sub: mlc.ConfigDict, subdir: Path) -> bool:
    """True when SUBDIR was started with this config, False when it holds no run; a run with
    another config is refused (resuming it would silently continue a different experiment)."""
    from fmsd_jax import checkpointing

    diff = checkpointing.config_differences(subdir, sub)
    if diff:
        raise AlreadyExists(
            f"{subdir} was trained with a different config (differs in {diff[:8]}); delete "
            "it or use another --workdir")
    return diff is not None


def run_row(cfg: mlc.ConfigDict, method: str, subdir: Path, data_dir: Path,
            pretrained_dir: Path) -> tuple[dict, float, bool]:
    """(results, seconds, skipped) of one method, trained by the regular pipeline."""
    from fmsd_jax import train

    sub = method_config(cfg, method, data_dir, pretrained_dir)
    done = row_is_done(sub, subdir)
    if done is not None:
        log.info("%s: finished run found in %s, skipping", ROW_NAMES[method], subdir)
        return done, 0.0, True
    log.info("=== %s → %s", ROW_NAMES[method], subdir)
    t0 = time.perf_counter()
    results = train.train(sub, subdir)
    return results, time.perf_counter() - t0, False


# ---------------------------------------------------------------------------------------------
# Commands that reproduce a row


def _load_config_file(arg: str) -> mlc.ConfigDict | None:
    path = Path(__file__).resolve().parents[1] / CONFIG_FILE
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("_fmsd_demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.get_config(arg)


def _overrides(cfg: mlc.ConfigDict) -> list[str]:
    """`--config.a.b=v` for every field the user changed from the config file's defaults."""
    base = _load_config_file(cfg.demo.variant)
    if base is None:
        return []
    config_base.apply_regime(base)
    from fmsd_jax import checkpointing

    mine = checkpointing.flat_keys(checkpointing.jsonable_config(cfg))
    theirs = checkpointing.flat_keys(checkpointing.jsonable_config(base))
    out = []
    for key in sorted(mine):
        if key in ("demo.method", "demo.root", "demo.sweep.enabled") \
                or mine[key] == theirs.get(key):
            continue
        value = mine[key]
        text = repr(tuple(value)) if isinstance(value, list) else str(value)
        out.append(shlex.quote(f"--config.{key}={text}"))
    return out


def row_command(cfg: mlc.ConfigDict, method: str, subdir: Path) -> str:
    arg = ",".join(filter(None, [cfg.demo.variant, f"method={method}"]))
    parts = ["python -m fmsd_jax.main", f"--config {CONFIG_FILE}:{arg}",
             f"--workdir {shlex.quote(str(subdir))}", *_overrides(cfg)]
    if cfg.demo.root and Path(cfg.demo.root) != subdir.parent:
        parts.append(shlex.quote(f"--config.demo.root={cfg.demo.root}"))
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# The whole demo


def _methods(cfg: mlc.ConfigDict) -> Iterator[str]:
    if cfg.demo.method == "all":
        yield from cfg.demo.methods
    else:
        yield cfg.demo.method


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
    (`configs/demo.py:sweep`) the learning-rate sweep runs instead (`run_sweep`). Each row's
    workdir is locked for the whole demo (`workdir_lock`; main locks WORKDIR itself), because
    a row can also be trained by its own command."""
    if cfg.demo.sweep.enabled:
        return run_sweep(cfg, workdir)
    workdir = Path(workdir)
    with contextlib.ExitStack() as rows:
        if cfg.demo.method == "all":
            import jax

            for method in cfg.demo.methods:
                rows.enter_context(workdir_lock.exclusive(
                    workdir / method, "train", process_index=jax.process_index()))
        return _run(cfg, workdir)


def _run(cfg: mlc.ConfigDict, workdir: Path) -> dict[str, Any]:
    clock = _Clock()
    load_start = os.getloadavg()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir, pretrained_dir = _paths(cfg, workdir)
    skipped: list[str] = []

    reads_only = _reads_only(cfg, workdir)
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
            prepare_data(cfg, data_dir)
    with clock.stage("pretrain"):
        if not reads_only:
            backbone = prepare_backbone(cfg, pretrained_dir)
    if backbone.get("skipped"):
        skipped.append("pretrain")

    results: dict[str, dict] = {}
    single = cfg.demo.method != "all"
    for method in _methods(cfg):
        subdir = workdir if single else workdir / method
        with clock.stage(method):
            res, _, was_skipped = run_row(cfg, method, subdir, data_dir, pretrained_dir)
        results[method] = res
        if was_skipped:
            skipped.append(method)
    section = ""
    if not single and cfg.demo.robustness.family:  # issue 14: one held-out family, every row
        with clock.stage("robustness"):
            section = robustness.demo_section(cfg.demo.robustness.family, {
                ROW_NAMES[m]: (method_config(cfg, m, data_dir, pretrained_dir), workdir / m)
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
           "variant": cfg.demo.variant or "full", "backend": _backend(),
           "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    timing_path = workdir / "demo_timing.json"
    if skipped and timing_path.exists():
        # Keep the timing of the run that did the work; a rerun only adds its own line.
        record = json.loads(timing_path.read_text())
        record["last_rerun"] = now
    else:
        record = now
    atomic.write_json(timing_path, record, sort_keys=False)
    out["report"] = write_report(cfg, workdir, results, backbone, record)
    if section:
        robustness.append_to_report(out["report"], section)
    log.info("demo finished in %.0fs (%.0f CPU-s, load %.1f → %.1f); report: %s",
             timing["total"], clock.cpu["total"], load_start[0], load["end"][0], out["report"])
    return out


def _backend() -> str:
    import jax

    return f"{jax.default_backend()} ({jax.device_count()} device(s))"


def _fmt_load(load: Mapping[str, Any]) -> str:
    s, e = load["start"], load["end"]
    return (f"1-min load average {s[0]:.1f} at start and {e[0]:.1f} at the end on "
            f"{load['cpus']} CPUs")


def write_report(cfg: mlc.ConfigDict, workdir: Path, results: Mapping[str, dict],
                 backbone: Mapping[str, Any], timing_record: Mapping[str, Any]) -> Path:
    """WORKDIR/report.md through `report.write_demo_report`, with how the numbers were made."""
    methods = list(cfg.demo.methods)
    rows = [report.DemoRow(method=ROW_NAMES[m], results=results[m],
                           command=row_command(cfg, m, workdir / m), note=_row_note(cfg, m),
                           **_contribution(workdir / m))
            for m in methods]
    p = backbone.get("params", {})
    hist = backbone.get("history") or [{}]
    knn = backbone.get("knn_identity_accuracy") or {}
    timing = timing_record["timing"]
    reused = set(timing_record.get("skipped", ()))  # their seconds are a skip, not the work
    intro = [
        "Everything here was produced offline on this machine by "
        f"`python -m fmsd_jax.main --config {CONFIG_FILE}"
        f"{':' + cfg.demo.variant if cfg.demo.variant else ''} --workdir {workdir}`.",
        "",
        f"**Data.** The synthetic cross-forgery benchmark (size `{cfg.demo.data_size}`, seed "
        f"{cfg.demo.data_seed}, {cfg.data.image_size} px): real 'videos' are slow pans over "
        "photographs bundled with scikit-image and matplotlib; each dataset's fakes carry one "
        "artifact family (SynBlend: blended face-swap-like patch, SynUpsample: "
        "down/up-sampled region, SynAutoencode: autoencoder-reconstructed region, SynSplice: "
        "region from another photo). Train, validation and test use disjoint photographs.",
        "",
        f"**Backbone.** A CLIP-shaped ViT (width {p.get('width')}, {p.get('layers')} layers, "
        f"{p.get('heads')} heads, patch {p.get('patch_size')}, quick_gelu) pretrained by "
        f"SimCLR for {p.get('steps')} steps on crops of the {backbone.get('num_train_photos')} "
        "real *training* photographs only (no fake frame, no validation or test photo), saved "
        "as a Hugging Face CLIP `model.safetensors` and loaded by every row through "
        "`load_clip_vision`, as real CLIP weights are. NT-Xent loss "
        f"{hist[0].get('loss', float('nan')):.3f} → {hist[-1].get('loss', float('nan')):.3f}; "
        "1-NN accuracy of telling which unseen (validation) photograph an augmented crop comes "
        f"from: {knn.get('init', float('nan')):.3f} at initialisation → "
        f"{knn.get('pretrained', float('nan')):.3f} pretrained (chance "
        f"{backbone.get('knn_chance') or float('nan'):.3f}).",
        "",
        "**Protocol.** Every row trains on SynBlend only, with the same data, steps "
        f"({cfg.train.total_steps} at batch {cfg.train.batch_size}), augmentation and seed; "
        "the checkpoint is chosen by frame AUC on SynBlend's *validation* split. "
        f"Hyper-parameters (listed under Reproduce) are those of `{CONFIG_FILE}`, whose "
        "docstring records how they were chosen: the backbone learning rates by one "
        "sweep scored on SynBlend's validation split only (see *Learning rates* below), "
        "never by a held-out score; nothing was tuned on SynUpsample, SynAutoencode or "
        "SynSplice. One seed: differences of a few hundredths are within run-to-run noise "
        f"on a test set this small ({_test_size(results)}).",
        "",
        "**Sources.** Each row's numbers are its own results file: "
        + ", ".join(f"{ROW_NAMES[m]} `{m}/{report.RESULTS_JSON}`" for m in methods)
        + " (a later `--mode evaluate` of a row refuses to replace them under this report).",
        "",
        "**Time.** " + ", ".join(f"{k} reused (done by an earlier run)" if k in reused
                                 else f"{k} {v:.0f}s" for k, v in timing.items())
        + f" ({_fmt_load(timing_record['load'])}; the machine may have been shared; "
        "demo_timing.json also holds each stage's CPU seconds and load average).",
    ]
    layer_chart = workdir / "fmsd" / "layer_scores.png"
    roc = {ROW_NAMES[m]: workdir / m / report.ROC_PNG for m in methods
           if (workdir / m / report.ROC_PNG).exists()}
    return report.write_demo_report(
        workdir / "report.md", rows, train_families=list(cfg.data.train_dataset),
        ours=ROW_NAMES["fmsd"], layer_chart=layer_chart if layer_chart.exists() else None,
        roc_charts=roc, intro=intro, sections=[_lr_section(cfg, workdir)])


def _test_size(results: Mapping[str, dict]) -> str:
    """'16 videos (128 frames) per family', from the results themselves."""
    sizes = {(int(r.get("num_videos") or 0), int(r.get("num_frames") or 0))
             for res in results.values() for r in res.values()}
    if len(sizes) != 1:
        return "test sets of " + ", ".join(f"{v} videos ({f} frames)" for v, f in sorted(sizes))
    (v, f), = sizes
    return f"{v} videos ({f} frames) per family"


def _contribution(rundir: Path) -> dict[str, Any]:
    """DemoRow's contribution fields from the row's diagnostics.json (fmsd_jax/diagnostics.py):
    validation frame AUC of the trained detector minus the pretrained backbone with the same
    head, and its bootstrap interval. Empty when the file or the measurement is missing."""
    path = rundir / report.DIAGNOSTICS_JSON
    if not path.is_file():
        return {}
    c = (json.loads(path.read_text()) or {}).get("contribution") or {}
    if c.get("frame_auc") is None:
        return {}
    ci = (c.get("ci95") or {}).get("frame_auc")
    return {"contribution": float(c["frame_auc"]),
            "contribution_ci": (float(ci[0]), float(ci[1])) if ci else None,
            "contribution_videos": c.get("num_videos")}


def _lr_section(cfg: mlc.ConfigDict, workdir: Path) -> str:
    """The learning rates every row used, and where they came from (the sweep's table when
    WORKDIR/sweep/sweep.json exists, else the config's docstring)."""
    lines = ["## Learning rates", "",
             "| method | backbone lr | head lr |", "|---|---:|---:|"]
    for m in cfg.demo.methods:
        o = cfg.demo.optim[m]
        lr = "— (frozen)" if m == "linear_probe" else f"{o.lr:g}"
        lines.append(f"| {ROW_NAMES[m]} | {lr} | {o.head_lr:g} |")
    lines.append("")
    sweep = workdir / SWEEP_DIR / SWEEP_JSON
    how = (f"Chosen by `{CONFIG_FILE}:sweep`: for every method that trains a backbone, the same "
           f"grid of backbone lrs ({', '.join(f'{x:g}' for x in cfg.demo.sweep.lrs)}) at one "
           "head lr, each run scored by its best frame AUC on SynBlend's *validation* split; no "
           "test set is evaluated during the sweep.")
    if sweep.is_file():
        rec = json.loads(sweep.read_text())
        lines += [how + " This workdir's sweep:", "",
                  report.sweep_table(rec["points"], rec["chosen"], metric=rec["metric"])]
        mismatch = [m for m, lr in rec["chosen"].items()
                    if m in cfg.demo.optim and not math.isclose(cfg.demo.optim[m].lr, lr)]
        if mismatch:
            lines.append(f"Note: this sweep chose other rates than the rows used for "
                         f"{', '.join(ROW_NAMES[m] for m in mismatch)}; the rows use "
                         f"`{CONFIG_FILE}`'s values.")
    else:
        lines.append(how + f" The table and its command are in `{CONFIG_FILE}`'s docstring.")
    return "\n".join(lines)


def _row_note(cfg: mlc.ConfigDict, method: str) -> str:
    o = cfg.demo.optim[method]
    m = cfg.method
    what = {
        "fmsd": f"K={m.num_subspaces} artifact subspaces of rank {m.rank} on the top "
                f"{m.mask.top_k} layers by forgery-aware masking, λ_orth={m.lambda_orth}, "
                f"λ_spec={m.lambda_spec}",
        "effort": "K=1, d=1 on every q/k/v/out projection, no mask, CE only",
        "full": "every backbone parameter trains",
        "linear_probe": "frozen backbone, only the head trains",
    }[method]
    return f"{what}; lr {o.lr:g}, head lr {o.head_lr:g}"


# ---------------------------------------------------------------------------------------------
# The learning-rate sweep (`configs/demo.py:sweep`)

SWEEP_DIR = "sweep"
SWEEP_JSON = "sweep.json"


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
    from fmsd_jax import checkpointing

    ckpts = checkpointing.RunCheckpoints(subdir, select_metric=select_metric)
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
    from fmsd_jax import checkpointing, train

    workdir = Path(workdir)
    data_dir, pretrained_dir = _paths(cfg, workdir)
    prepare_data(cfg, data_dir)
    prepare_backbone(cfg, pretrained_dir)
    out_dir = workdir / SWEEP_DIR
    metric = cfg.eval.select_metric
    points: list[dict[str, Any]] = []
    for method in cfg.demo.sweep.methods:
        for lr in cfg.demo.sweep.lrs:
            sub = sweep_config(cfg, method, lr, data_dir, pretrained_dir)
            subdir = out_dir / f"{method}_lr{lr:g}"
            done = (_same_config(sub, subdir)
                    and checkpointing.latest_saved_step(subdir) == sub.train.total_steps)
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
                           "best": best, **_contribution(subdir), "seconds": seconds,
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
                     f"--workdir {shlex.quote(str(workdir))}", *_overrides(cfg)])
