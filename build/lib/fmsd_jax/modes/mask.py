"""`--mode mask`: estimate and save the layer mask only (no training)."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx

from fmsd_jax import parallel
from fmsd_jax.errors import AlreadyExists, BadInput
from fmsd_jax.evaluators import plots
from fmsd_jax.run import checkpoints, factory, layer_selection, manifest, preflight, workdir_files


def mask_only(cfg: mlc.ConfigDict, workdir: str | Path) -> np.ndarray:
    """`--mode mask`: estimate, save and plot the layer mask, nothing else."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if not (cfg.method.regime == "fmsd" and cfg.method.mask.enabled):
        raise BadInput(f"config.method.regime={cfg.method.regime!r} with mask.enabled="
                       f"{cfg.method.mask.enabled} uses no layer mask; nothing to estimate")
    if checkpoints.latest_saved_step(workdir) is not None:
        raise AlreadyExists(
            f"{workdir} holds checkpoints trained under its {workdir_files.MASK_JSON}; --mode "
            "mask would replace that record of their mask (they keep their own copy, which "
            "restoring reads). Estimate it in a new --workdir")
    mesh = parallel.make_mesh(cfg.mesh)
    parallel.check_batch_fits(mesh, cfg.train.batch_size)
    preflight.check_config(cfg)
    manifest.record(workdir, "mask", preflight.check_data(cfg, "mask"))
    detector = factory.build_detector(cfg)
    nnx.update(detector, parallel.shard_tree(mesh, nnx.state(detector)))
    mask = layer_selection.estimate_mask(cfg, detector, workdir, mesh,
                                         stability_seeds=cfg.method.mask.stability_seeds)
    if jax.process_index() == 0:
        plots.plot_layer_mask(workdir, cfg.method.regime)
    return mask
