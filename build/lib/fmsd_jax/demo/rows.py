"""One row of the demo: its config (a method on the demo's shared data and backbone),
its workdir and the command that reproduces it, whether it is done, and running it. The
demo's shared inputs (data, pretrained backbone) are prepared here once for every row."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections as mlc

from fmsd_jax import config_base
from fmsd_jax.demo import METHODS
from fmsd_jax.errors import AlreadyExists, BadInput
from fmsd_jax.evaluators import result_files
from fmsd_jax.run import workdir_files

log = logging.getLogger("fmsd_jax")

# Row names in the report; "FMSD" is ours, the others are baselines.
ROW_NAMES = {m: result_files.method_name(m) for m in METHODS}
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
    if cfg.demo.method == "all" or has_inputs(workdir):
        return workdir
    parent = workdir.absolute().parent
    return parent if has_inputs(parent) else workdir


def has_inputs(root: Path) -> bool:
    """Whether ROOT holds what a row reads: the benchmark's JSONs and the backbone."""
    return (root / "data" / "dataset_json").is_dir() and \
        (root / "pretrained" / "model.safetensors").is_file()


def row_paths(cfg: mlc.ConfigDict, workdir: str | os.PathLike) -> tuple[Path, Path]:
    root = shared_root(cfg, workdir).absolute()
    return root / "data", root / "pretrained"


def reads_prepared_inputs(cfg: mlc.ConfigDict, workdir: Path) -> bool:
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
    data_dir, pretrained_dir = row_paths(cfg, workdir)
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
    from fmsd_jax.data.synthetic import real_photos
    from fmsd_jax.demo import pretrain

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
    if not same_config(sub, subdir) or not (subdir / workdir_files.RESULTS_JSON).exists():
        return None
    results = result_files.read_results(subdir)
    if not all(name in results for name in sub.data.test_dataset):
        return None
    return results


def same_config(sub: mlc.ConfigDict, subdir: Path) -> bool:
    """True when SUBDIR was started with this config, False when it holds no run; a run with
    another config is refused (resuming it would silently continue a different experiment)."""
    from fmsd_jax.run import checkpoints

    diff = checkpoints.config_differences(subdir, sub)
    if diff:
        raise AlreadyExists(
            f"{subdir} was trained with a different config (differs in {diff[:8]}); delete "
            "it or use another --workdir")
    return diff is not None


def run_row(cfg: mlc.ConfigDict, method: str, subdir: Path, data_dir: Path,
            pretrained_dir: Path) -> tuple[dict, float, bool]:
    """(results, seconds, skipped) of one method, trained by the regular pipeline."""
    from fmsd_jax.modes import train

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


def load_config_file(arg: str) -> mlc.ConfigDict | None:
    path = Path(__file__).resolve().parents[2] / CONFIG_FILE  # the checkout: fmsd_jax/demo/..
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("_fmsd_demo_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.get_config(arg)


def overrides(cfg: mlc.ConfigDict) -> list[str]:
    """`--config.a.b=v` for every field the user changed from the config file's defaults."""
    base = load_config_file(cfg.demo.variant)
    if base is None:
        return []
    config_base.apply_regime(base)
    from fmsd_jax.run import checkpoints

    mine = checkpoints.flat_keys(checkpoints.jsonable_config(cfg))
    theirs = checkpoints.flat_keys(checkpoints.jsonable_config(base))
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
             f"--workdir {shlex.quote(str(subdir))}", *overrides(cfg)]
    if cfg.demo.root and Path(cfg.demo.root) != subdir.parent:
        parts.append(shlex.quote(f"--config.demo.root={cfg.demo.root}"))
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# The whole demo


def methods(cfg: mlc.ConfigDict) -> Iterator[str]:
    if cfg.demo.method == "all":
        yield from cfg.demo.methods
    else:
        yield cfg.demo.method


def contribution(rundir: Path) -> dict[str, Any]:
    """DemoRow's contribution fields from the row's diagnostics.json
    (fmsd_jax/evaluators/adaptation.py):
    validation frame AUC of the trained detector minus the pretrained backbone with the same
    head, and its bootstrap interval. Empty when the file or the measurement is missing."""
    path = rundir / workdir_files.DIAGNOSTICS_JSON
    if not path.is_file():
        return {}
    c = (json.loads(path.read_text()) or {}).get("contribution") or {}
    if c.get("frame_auc") is None:
        return {}
    ci = (c.get("ci95") or {}).get("frame_auc")
    return {"contribution": float(c["frame_auc"]),
            "contribution_ci": (float(ci[0]), float(ci[1])) if ci else None,
            "contribution_videos": c.get("num_videos")}
