"""Export a trained detector as plain dense weights for deployment.

The artifact subspaces are merged back into each weight, so inference costs exactly what the
base ViT costs, and the backbone is written in Hugging Face's layout so PyTorch users load it
with `transformers.CLIPVisionModel.from_pretrained(dir)`; the head goes beside it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from fmsd_jax import assemble, atomic, build, checkpointing, sharding
from fmsd_jax.method import decompose as decomp
from fmsd_jax.model.checkpoint import save_hf_clip_vision

log = logging.getLogger("fmsd_jax")

HEAD_FILE = "head.safetensors"
DETECTOR_JSON = "detector.json"


def export(cfg: mlc.ConfigDict, workdir: str | Path, out_dir: str | Path | None = None) -> Path:
    workdir = Path(workdir)
    out = Path(out_dir or cfg.export.out_dir or workdir / "export")
    mesh = sharding.make_mesh(cfg.mesh)
    run = build.prepare(cfg, workdir, mesh, estimate=False)
    trainable = build.restore_trainable(cfg, workdir, run, "exporting")
    detector = nnx.merge(run.graphdef, jax.device_get(trainable), jax.device_get(run.frozen))
    if assemble.uses_decomposition(cfg):
        decomp.merge(detector)
    if jax.process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    save_hf_clip_vision(detector.backbone, out)
    # torch.nn.Linear layout: weight (num_classes, width).
    with atomic.replacing(out / HEAD_FILE) as tmp:
        save_file({"weight": np.ascontiguousarray(np.asarray(detector.head_kernel[...]).T),
                   "bias": np.asarray(detector.head_bias[...])}, str(tmp))
    checkpointing.write_json_atomic(out / DETECTOR_JSON, {
        "head": HEAD_FILE, "num_classes": cfg.model.num_classes, "fake_class": 1,
        "feature": "pooler_output", "image_size": cfg.model.image_size,
        "mean": list(cfg.data.mean), "std": list(cfg.data.std),
        "regime": cfg.method.regime, "source_workdir": str(workdir.absolute()),
    })
    log.info("exported merged weights to %s (load with CLIPVisionModel.from_pretrained)", out)
    return out
