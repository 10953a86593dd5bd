"""Turn a config into a ready detector: pretrained CLIP, head, layer mask, decomposition.

Shared by training, evaluation, export and prediction, so every mode rebuilds exactly the
same module structure from the workdir's sidecars and the pretrained weights it names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ml_collections as mlc
import numpy as np
from flax import nnx

from fmsd_jax.errors import BadInput, InputNotFound
from fmsd_jax.method import decompose as decomp
from fmsd_jax.model.checkpoint import load_clip_vision
from fmsd_jax.model.detector import Detector
from fmsd_jax.model.vit import VARIANTS


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
