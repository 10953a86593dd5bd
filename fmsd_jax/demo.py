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

import copy
import importlib.util
import json
import logging
import os
import shlex
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_collections as mlc

from fmsd_jax import config_base, report
from fmsd_jax.errors import AlreadyExists, BadInput

log = logging.getLogger("fmsd_jax")

METHODS = ("fmsd", "effort", "full", "linear_probe")
# Row names in the report; "FMSD" is ours, the others are baselines.
ROW_NAMES = {
    "fmsd": "FMSD",
    "effort": "Effort (K=1, d=1, no mask)",
    "full": "Full fine-tuning",
    "linear_probe": "Linear probe",
}
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


def _jsonable_config(cfg: mlc.ConfigDict) -> Any:
    from fmsd_jax import checkpointing

    return json.loads(json.dumps(checkpointing._jsonable(cfg.to_dict()), sort_keys=True))


def row_is_done(sub: mlc.ConfigDict, subdir: Path) -> dict | None:
    """The results of a finished row, None if it still has to (re)run.

    A row directory trained with a different config is refused rather than mixed with this
    one: its checkpoints would silently resume into a different experiment."""
    from fmsd_jax import checkpointing

    cfg_path = subdir / checkpointing.CONFIG_JSON
    if not cfg_path.exists():
        return None
    found = checkpointing.read_json(cfg_path)
    if found != _jsonable_config(sub):
        want = _jsonable_config(sub)
        diff = sorted(k for k in _flat(found).keys() | _flat(want).keys()
                      if _flat(found).get(k) != _flat(want).get(k))
        raise AlreadyExists(
            f"{subdir} was trained with a different config (differs in {diff[:8]}); delete "
            "it or use another --workdir")
    if not (subdir / report.RESULTS_JSON).exists():
        return None
    results = report.read_results(subdir)
    if not all(name in results for name in sub.data.test_dataset):
        return None
    return results


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


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
    mine = _flat(_jsonable_config(cfg))
    theirs = _flat(_jsonable_config(base))
    out = []
    for key in sorted(mine):
        if key in ("demo.method", "demo.root") or mine[key] == theirs.get(key):
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


def run(cfg: mlc.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Run every missing stage; return {'results', 'timing', 'skipped', 'report'}.

    With `demo.method='all'` the rows go to WORKDIR/<method> and WORKDIR/report.md is written;
    with a single method, WORKDIR is that row's run directory."""
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir, pretrained_dir = _paths(cfg, workdir)
    timing: dict[str, float] = {}
    skipped: list[str] = []

    if _reads_only(cfg, workdir):
        log.info("reading the benchmark from %s and the backbone from %s (the demo in the "
                 "workdir's parent; --config.demo.root=DIR picks another)", data_dir,
                 pretrained_dir)
        backbone: dict[str, Any] = {"skipped": True}
    else:
        log.info("writing the benchmark to %s and the backbone to %s, where missing%s",
                 data_dir, pretrained_dir,
                 "" if cfg.demo.root or cfg.demo.method == "all" else
                 " (no prepared demo in the workdir's parent; --config.demo.root=DIR shares "
                 "one between rows)")
        timing["data"] = prepare_data(cfg, data_dir)
        t0 = time.perf_counter()
        backbone = prepare_backbone(cfg, pretrained_dir)
        timing["pretrain"] = time.perf_counter() - t0
    if backbone.get("skipped"):
        skipped.append("pretrain")

    results: dict[str, dict] = {}
    single = cfg.demo.method != "all"
    for method in _methods(cfg):
        subdir = workdir if single else workdir / method
        res, seconds, was_skipped = run_row(cfg, method, subdir, data_dir, pretrained_dir)
        results[method] = res
        timing[method] = seconds
        if was_skipped:
            skipped.append(method)
    section = ""
    if not single and cfg.demo.robustness.family:  # issue 14: one held-out family, every row
        from fmsd_jax import robustness

        t0 = time.perf_counter()
        section = robustness.demo_section(cfg.demo.robustness.family, {
            ROW_NAMES[m]: (method_config(cfg, m, data_dir, pretrained_dir), workdir / m)
            for m in cfg.demo.methods}, levels=tuple(cfg.demo.robustness.levels))
        timing["robustness"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_start
    out: dict[str, Any] = {"results": results, "timing": timing, "skipped": skipped,
                           "report": None}
    if single:
        log.info("row %s done in %.0fs (%s)", cfg.demo.method, timing["total"], workdir)
        return out

    load = {"start": list(load_start), "end": list(os.getloadavg()), "cpus": os.cpu_count()}
    timing_path = workdir / "demo_timing.json"
    if skipped and timing_path.exists():
        # Keep the timing of the run that did the work; a rerun only adds its own line.
        previous = json.loads(timing_path.read_text())
        previous["last_rerun"] = {"timing": timing, "skipped": skipped, "load": load}
        record = previous
    else:
        record = {"timing": timing, "skipped": skipped, "load": load}
    timing_path.write_text(json.dumps(record, indent=2))
    out["report"] = write_report(cfg, workdir, results, backbone, record)
    if section:
        robustness.append_to_report(out["report"], section)
    log.info("demo finished in %.0fs; report: %s", timing["total"], out["report"])
    return out


def _fmt_load(load: Mapping[str, Any]) -> str:
    s, e = load["start"], load["end"]
    return (f"1-min load average {s[0]:.1f} at start and {e[0]:.1f} at the end on "
            f"{load['cpus']} CPUs")


def write_report(cfg: mlc.ConfigDict, workdir: Path, results: Mapping[str, dict],
                 backbone: Mapping[str, Any], timing_record: Mapping[str, Any]) -> Path:
    """WORKDIR/report.md through `report.write_demo_report`, with how the numbers were made."""
    methods = list(cfg.demo.methods)
    rows = [report.DemoRow(method=ROW_NAMES[m], results=results[m],
                           command=row_command(cfg, m, workdir / m), note=_row_note(cfg, m))
            for m in methods]
    p = backbone.get("params", {})
    hist = backbone.get("history") or [{}]
    knn = backbone.get("knn_identity_accuracy") or {}
    timing = timing_record["timing"]
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
        "docstring records how they were chosen: by reasoning and on SynBlend's validation "
        "split only, never by a held-out score; nothing was tuned on SynUpsample, "
        "SynAutoencode or SynSplice. One seed: differences of a few hundredths are within "
        "run-to-run noise on a test set this small.",
        "",
        "**Time.** " + ", ".join(f"{k} {v:.0f}s" for k, v in timing.items())
        + f" ({_fmt_load(timing_record['load'])}; the machine may have been shared).",
    ]
    layer_chart = workdir / "fmsd" / "layer_scores.png"
    roc = {ROW_NAMES[m]: workdir / m / "roc.png" for m in methods
           if (workdir / m / "roc.png").exists()}
    return report.write_demo_report(
        workdir / "report.md", rows, train_families=list(cfg.data.train_dataset),
        ours=ROW_NAMES["fmsd"], layer_chart=layer_chart if layer_chart.exists() else None,
        roc_charts=roc, intro=intro)


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
