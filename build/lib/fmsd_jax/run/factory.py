"""Turn a config into a ready detector: pretrained CLIP, head, layer mask, decomposition.

Shared by training, evaluation, export and prediction, so every mode rebuilds exactly the
same module structure from the pretrained weights the config names (and, once a run has
checkpoints, the record they hold: fmsd_jax/run/rebuild.py).
`abstract_detector` builds that same structure as shapes only (no weights file, no SVD run),
for compiling the steps ahead of time (fmsd_jax/modes/plan.py).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import ml_collections as mlc
import numpy as np
from flax import nnx

from fmsd_jax.errors import BadInput, InputNotFound
from fmsd_jax.method import decompose as decomp
from fmsd_jax.method.objective import ObjectiveConfig
from fmsd_jax.method.optimizer import OptimConfig
from fmsd_jax.model.detector import Detector
from fmsd_jax.model.vit import VARIANTS, CLIPVisionTower, ViTConfig
from fmsd_jax.model.weights.load import load_clip_vision


def optim_section(cfg: mlc.ConfigDict) -> OptimConfig:
    """`config.optim` as the method layer's OptimConfig. Every field comes from the config
    (config_base.py holds the defaults); a field either side lacks is an error, so the schema
    and the dataclass cannot drift apart."""
    return _typed_section(OptimConfig, cfg.optim, "optim", exact=True)


def objective_section(cfg: mlc.ConfigDict) -> ObjectiveConfig:
    """The objective's fields of `config.method` as the method layer's ObjectiveConfig."""
    return _typed_section(ObjectiveConfig, cfg.method, "method", exact=False)


def _typed_section(cls: type, section: Any, name: str, *, exact: bool) -> Any:
    """`cls(**fields)` from a config section; `exact`: the section holds nothing else."""
    fields = [f.name for f in dataclasses.fields(cls)]
    missing = [f for f in fields if f not in section]
    if missing:
        raise ValueError(f"config.{name} lacks {missing} (config_base.py defines them)")
    unknown = sorted(set(section) - set(fields)) if exact else []
    if unknown:
        raise ValueError(f"unknown {name} field(s) {unknown}; known: {sorted(fields)}")
    return cls(**{f: section[f] for f in fields})


def check_init_from(cfg: mlc.ConfigDict) -> Path:
    path = cfg.model.init_from
    if not path:
        raise BadInput(
            "config.model.init_from is empty: set it to a pretrained CLIP checkpoint, e.g. "
            "--config.model.init_from=/path/to/clip-vit-base-patch16/model.safetensors "
            "(README: 'Getting CLIP weights')")
    path = Path(os.path.expanduser(path))
    if not path.exists():
        raise InputNotFound(
            f"config.model.init_from={str(path)!r} does not exist; download the CLIP checkpoint "
            "(README: 'Getting CLIP weights') and point config.model.init_from at the file")
    return path


def build_detector(cfg: mlc.ConfigDict, *, seed: int | None = None) -> Detector:
    """Load the pretrained tower named by init_from and put a fresh linear head on it."""
    path = check_init_from(cfg)
    tower = load_clip_vision(
        path, image_size=cfg.model.image_size, dtype=cfg.model.dtype,
        attention_impl=cfg.model.attention_impl, remat=cfg.model.remat)
    _check_geometry(cfg, tower.cfg, path)
    rngs = nnx.Rngs(cfg.seed if seed is None else seed)
    return Detector(tower, num_classes=cfg.model.num_classes, rngs=rngs,
                    pixel_mean=cfg.data.mean, pixel_std=cfg.data.std)


def tower_config(cfg: mlc.ConfigDict) -> ViTConfig:
    """The tower's geometry without loading weights: the variant's, or init_from's for 'auto'."""
    numerics = dict(image_size=cfg.model.image_size, dtype=cfg.model.dtype,
                    attention_impl=cfg.model.attention_impl, remat=cfg.model.remat)
    if cfg.model.variant != "auto":
        if cfg.model.variant not in VARIANTS:
            raise ValueError(f"config.model.variant={cfg.model.variant!r} is unknown; use one "
                             f"of {sorted(VARIANTS)} or 'auto'")
        return ViTConfig.from_variant(cfg.model.variant, **numerics)
    if not cfg.model.init_from:
        raise ValueError("config.model.variant='auto' takes the geometry from "
                         "config.model.init_from, which is empty: set config.model.variant "
                         f"to one of {sorted(VARIANTS)} or point init_from at a checkpoint")
    from fmsd_jax.model.weights.load import read_clip_vision

    geometry, _ = read_clip_vision(check_init_from(cfg), cfg.model.image_size)
    return dataclasses.replace(geometry, **numerics)


def abstract_detector(cfg: mlc.ConfigDict, *, decomposed: bool = True
                      ) -> tuple[Detector, decomp.DecompositionSpec | None]:
    """The detector a run would train, as ShapeDtypeStructs: built and decomposed under
    `nnx.eval_shape`, so the SVD is traced, never run, and no weights file is read.
    `decomposed=False`: the dense pretrained detector that the mask estimator differentiates."""
    vit_cfg = tower_config(cfg)
    specs = []

    def make() -> Detector:
        tower = CLIPVisionTower(vit_cfg, rngs=nnx.Rngs(0))
        detector = Detector(tower, num_classes=cfg.model.num_classes, rngs=nnx.Rngs(cfg.seed),
                            pixel_mean=cfg.data.mean, pixel_std=cfg.data.std)
        if decomposed and uses_decomposition(cfg):
            specs.append(decompose_detector(cfg, detector))
        return detector

    detector = nnx.eval_shape(make)
    return detector, (specs[0] if specs else None)


def _check_geometry(cfg: mlc.ConfigDict, got: Any, path: Path) -> None:
    variant = cfg.model.variant
    if variant == "auto":
        return
    if variant not in VARIANTS:
        raise BadInput(f"config.model.variant={variant!r} is unknown; use one of "
                       f"{sorted(VARIANTS)} or 'auto'")
    want = VARIANTS[variant]
    have = {k: getattr(got, k) for k in want if k != "proj_dim"}
    diff = {k: (want[k], v) for k, v in have.items() if want[k] != v}
    if diff:
        detail = ", ".join(f"{k}: config {a} vs checkpoint {b}" for k, (a, b) in diff.items())
        raise BadInput(
            f"config.model.variant={variant!r} declares a different geometry than "
            f"config.model.init_from={str(path)!r} ({detail}); point init_from at a {variant} "
            "checkpoint or set config.model.variant to match it ('auto' accepts any)")


def uses_decomposition(cfg: mlc.ConfigDict) -> bool:
    return cfg.method.regime in ("fmsd", "effort")


def decompose_detector(cfg: mlc.ConfigDict, detector: Detector) -> decomp.DecompositionSpec:
    return decomp.decompose(detector, targets=tuple(cfg.method.targets),
                            num_subspaces=cfg.method.num_subspaces, rank=cfg.method.rank)


def full_mask(cfg: mlc.ConfigDict, detector: Detector) -> np.ndarray:
    """Every candidate layer trains (Effort, or FMSD with masking switched off)."""
    return np.ones((detector.backbone.cfg.layers, len(cfg.method.targets)), np.float32)
