"""Checks that run before any work is spent, so a user's mistake costs seconds, not a training run.

`check_config` validates every enumerated config field (regime, targets, loss form, optimizer,
mask score, attention, remat, data source) with the error naming the field. `check_data` then
resolves every dataset and split the mode will read (training, validation, every test set),
lists its sampled frames and checks that they exist (`config.data.check_files`), so a missing
frame of a *test* set is named before the first training step rather than after the last one.
Its result is also the data fingerprint that the run manifest records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time

import ml_collections as mlc

from fmsd_jax.data import pipeline, sources
from fmsd_jax.data import records as rec
from fmsd_jax.errors import BadInput
from fmsd_jax.method.decompose import REGIMES
from fmsd_jax.method.masking import SCORES
from fmsd_jax.model.layers import ATTENTION_IMPLS
from fmsd_jax.model.vit import ATTN_PROJECTIONS, MLP_PROJECTIONS, REMAT_POLICIES
from fmsd_jax.run import factory

log = logging.getLogger("fmsd_jax")

MASK_SELECTIONS = ("top_k", "threshold")
DTYPES = ("float32", "bfloat16")


def check_workdir(workdir: str | os.PathLike) -> None:
    """--workdir is a folder this user can write (or can create): every mode writes there."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise BadInput(f"--workdir {workdir} is a file, not a folder; give a folder (it is "
                       "created if missing)")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise BadInput(f"--workdir {workdir}: {existing} is a file, so the folder cannot be "
                       "created; give another --workdir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"--workdir {workdir}: {existing} is not writable by this user; give a "
                       "folder you can write")


def _positive(cfg: mlc.ConfigDict, field: str, allow_zero: bool = False) -> None:
    value = cfg
    for key in field.split("."):
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero
                                                                         else 1):
        raise BadInput(f"config.{field}={value!r} must be an integer "
                       f"{'>= 0' if allow_zero else '>= 1'}; set --config.{field}=<that>")


def _one_of(field: str, value, allowed) -> None:
    if value not in allowed:
        raise BadInput(f"config.{field}={value!r} is not one of {tuple(allowed)}; "
                       f"set --config.{field}=<one of them>")


def check_config(cfg: mlc.ConfigDict) -> None:
    """Every enumerated field of a run config is valid (raises BadInput naming the field)."""
    m = cfg.method
    _one_of("method.regime", m.regime, REGIMES)
    for t in m.targets:
        _one_of("method.targets", t, ATTN_PROJECTIONS + MLP_PROJECTIONS)
    _one_of("method.mask.score", m.mask.score, SCORES)
    _one_of("method.mask.select", m.mask.select, MASK_SELECTIONS)
    _one_of("model.attention_impl", cfg.model.attention_impl, ATTENTION_IMPLS)
    _one_of("model.remat", cfg.model.remat, REMAT_POLICIES)
    _one_of("model.dtype", cfg.model.dtype, DTYPES)
    _one_of("data.source", cfg.data.source, sources.SOURCES)
    for field in ("train.batch_size", "eval.batch_size", "predict.batch_size",
                  "predict.video_frames", "train.log_every", "train.checkpoint_every"):
        _positive(cfg, field)
    for field in ("train.total_steps", "train.num_epochs", "train.eval_every"):
        _positive(cfg, field, allow_zero=True)
    if not cfg.train.total_steps and not cfg.train.num_epochs:
        raise BadInput("config.train.total_steps and config.train.num_epochs are both 0; set "
                       "one of them (--config.train.total_steps=N)")
    lr = cfg.optim.lr
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise BadInput(f"config.optim.lr={lr!r} must be a finite number above 0; set "
                       "--config.optim.lr=2e-4 (Effort's) or another")
    try:  # the method layer's own validators, so a new allowed value needs no edit here
        factory.objective_section(cfg)
        factory.optim_section(cfg)
    except ValueError as e:
        raise BadInput(f"{e}; fix it with --config.method.* / --config.optim.*") from None


def splits_read(cfg: mlc.ConfigDict, mode: str) -> list[tuple[str, str]]:
    """(dataset, split) pairs a mode reads, in the order it reads them."""
    train = [(name, "train") for name in cfg.data.train_dataset]
    val_split = cfg.eval.splits_from_train
    val = [(name, val_split) for name in cfg.data.train_dataset
           if pipeline.has_split(cfg.data, name, val_split)]
    test = [(name, "test") for name in cfg.data.test_dataset]
    if mode == "mask":
        return train
    if mode == "evaluate":
        return test
    return train + val + (test if cfg.train.eval_after_training else [])


def fingerprint(records: list[dict], root: str) -> str:
    """sha256 of the record list (paths relative to dataset_root, frame, label, video), so
    moving the data keeps the fingerprint and adding, dropping or relabelling a frame
    changes it."""
    h = hashlib.sha256()
    for r in records:
        path = os.path.relpath(r["path"], root) if root else r["path"]
        h.update(json.dumps([path, r["frame_index"], r["label"], r["video_id"]]).encode())
    return h.hexdigest()


def check_data(cfg: mlc.ConfigDict, mode: str) -> dict[str, dict]:
    """List and check every split the mode reads; returns {'dataset/split': summary} with
    frames, videos, real, fake and the record fingerprint."""
    t0 = time.perf_counter()
    out: dict[str, dict] = {}
    for name, split in splits_read(cfg, mode):
        if cfg.data.source == "tfds":  # packed files: their counts stand for the records
            _, info = sources.record_dataset(cfg.data, name, split)
            info = dict(info, sha256=hashlib.sha256(
                json.dumps(info, sort_keys=True).encode()).hexdigest())
        else:
            records = sources.list_records(cfg.data, name, split)
            info = dict(rec.summarise(records),
                        sha256=fingerprint(records, os.fspath(cfg.data.dataset_root)))
        out[f"{name}/{split}"] = info
    log.info("data checked in %.1fs: %s", time.perf_counter() - t0,
             ", ".join(f"{k} {v['frames']} frames" for k, v in out.items()))
    return out
