"""Our tower's weights out as a Hugging Face `CLIPVisionModel(WithProjection)`
checkpoint (`model.safetensors` + `config.json`): what `--mode export` writes and what the
tests' tiny CLIP is made of."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from fmsd_jax import atomic
from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig
from fmsd_jax.model.weights.containers import PathLike
from fmsd_jax.model.weights.layouts import (
    HF_GLOBAL,
    HF_LAYER,
    HF_PROJ,
    expected_shapes,
    flat_key,
    raise_problems,
)


def tower_weights(tower: CLIPVisionTower) -> dict[str, np.ndarray]:
    """The tower's parameters as float32 numpy arrays in our flat layout."""
    return {flat_key(path): np.asarray(jax.device_get(var.get_value()), dtype=np.float32)
            for path, var in nnx.to_flat_state(nnx.state(tower, nnx.Param))}


def to_hf_state_dict(cfg: ViTConfig, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our layout -> Hugging Face keys (`vision_model.*`, `visual_projection.weight`)."""
    shapes = expected_shapes(dataclasses.replace(cfg, dtype="float32", attention_impl=None))
    problems = [f"missing   {k}  (expected {list(s)})" for k, s in shapes.items()
                if k not in weights]
    problems += [f"unused    {k}  {list(np.shape(w))}" for k, w in weights.items()
                 if k not in shapes]
    raise_problems("tower", "not a plain dense CLIP tower (merge decomposed layers into dense "
                   "weights before exporting)", problems)
    out: dict[str, np.ndarray] = {}
    for r in HF_GLOBAL:
        out["vision_model." + r.theirs] = r.from_ours(weights[r.ours])
    for r in HF_LAYER:
        w = weights["transformer.blocks." + r.ours]
        for i in range(cfg.layers):
            out[f"vision_model.encoder.layers.{i}.{r.theirs}"] = r.from_ours(w[i])
    if cfg.proj_dim:
        out[HF_PROJ.theirs] = HF_PROJ.from_ours(weights["proj"])
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def hf_vision_config(cfg: ViTConfig) -> dict[str, Any]:
    """A transformers `CLIPVisionConfig` dict describing `cfg`."""
    return {
        "architectures": ["CLIPVisionModelWithProjection" if cfg.proj_dim else
                          "CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "patch_size": cfg.patch_size,
        "image_size": cfg.image_size,
        "num_channels": 3,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
        # transformers requires an int; 512 is its default and unused without a projection
        "projection_dim": cfg.proj_dim or 512,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "dtype": "float32",
    }


def save_hf_clip_vision(tower: CLIPVisionTower, out_dir: PathLike) -> pathlib.Path:
    """Write `tower` as a Hugging Face checkpoint directory (config.json + model.safetensors).

    Keys are the long-standing hub layout (`vision_model.*`), which every transformers version
    reads. A tower with a projection also gets `visual_projection.weight` and the architecture
    `CLIPVisionModelWithProjection`, which loads everything; `CLIPVisionModel.from_pretrained`
    loads the same directory and reports the projection as an unused key. Files are written
    to temporary names and renamed, so a crash never leaves a half-written checkpoint.
    Returns the directory.
    """
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tower.cfg
    tensors = to_hf_state_dict(cfg, tower_weights(tower))
    # Weights first, config last: a directory with config.json holds complete weights.
    with atomic.replacing(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic.write_json(out / "config.json", hf_vision_config(cfg), sort_keys=False)
    return out
