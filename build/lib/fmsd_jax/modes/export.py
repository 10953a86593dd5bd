"""Export a trained detector as plain dense weights for deployment.

The artifact subspaces are merged back into each weight, so inference costs exactly what the
base ViT costs, and the backbone is written in Hugging Face's layout so PyTorch users load it
with `transformers.CLIPVisionModel.from_pretrained(dir)`; the head goes beside it, and so do
the run's temperature and validation-chosen thresholds (decision.json): P(fake) is
softmax(head(pooler_output) / T)[1], labelled fake at a threshold of decision.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from fmsd_jax import atomic, parallel
from fmsd_jax.errors import AlreadyExists
from fmsd_jax.evaluators import decision
from fmsd_jax.method import decompose as decomp
from fmsd_jax.model.weights.export_hf import save_hf_clip_vision
from fmsd_jax.run import factory, rebuild, workdir_files
from fmsd_jax.run.workdir_files import DETECTOR_JSON, HEAD_FILE

log = logging.getLogger("fmsd_jax")


def check_out_dir(out: Path, workdir: Path) -> None:
    """The export goes into a new or empty folder, or replaces an earlier export of this same
    workdir; any other folder (a pretrained CLIP checkpoint, another run's export) is refused
    before work, since the export would overwrite its model.safetensors and config.json."""
    if out.exists() and not out.is_dir():
        raise AlreadyExists(f"export folder {out} is a file; pass --out with a new folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    source = None
    if (out / DETECTOR_JSON).is_file():
        try:
            source = atomic.read_json(out / DETECTOR_JSON).get("source_workdir")
        except (ValueError, OSError, AttributeError):
            source = None
    if source != str(workdir.absolute()):
        raise AlreadyExists(
            f"export folder {out} already holds files that are not an export of {workdir} "
            f"({'an export of ' + str(source) if source else 'no ' + DETECTOR_JSON}); pass "
            "--out with a new folder")
    log.info("export: replacing the earlier export of this workdir in %s", out)


def export(cfg: mlc.ConfigDict, workdir: str | Path, out_dir: str | Path | None = None) -> Path:
    workdir = Path(workdir)
    out = Path(out_dir or cfg.export.out_dir or workdir / workdir_files.EXPORT_DIR)
    check_out_dir(out, workdir)
    mesh = parallel.make_mesh(cfg.mesh)
    run = rebuild.open_run(cfg, workdir, mesh, estimate=False)
    trainable = rebuild.restore_trainable(cfg, workdir, run, "exporting")
    detector = nnx.merge(run.graphdef, jax.device_get(trainable), jax.device_get(run.frozen))
    if factory.uses_decomposition(cfg):
        decomp.merge(detector)
    if jax.process_index() != 0:
        return out
    out.mkdir(parents=True, exist_ok=True)
    save_hf_clip_vision(detector.backbone, out)
    # torch.nn.Linear layout: weight (num_classes, width).
    with atomic.replacing(out / HEAD_FILE) as tmp:
        save_file({"weight": np.ascontiguousarray(np.asarray(detector.head_kernel[...]).T),
                   "bias": np.asarray(detector.head_bias[...])}, str(tmp))
    rule = decision.load_decision(workdir)
    if rule.note:
        log.warning("export: %s", rule.note)
    atomic.write_json(out / workdir_files.DECISION_JSON, rule.to_json())
    atomic.write_json(out / DETECTOR_JSON, {
        "head": HEAD_FILE, "num_classes": cfg.model.num_classes, "fake_class": 1,
        "feature": "pooler_output", "image_size": cfg.model.image_size,
        "mean": list(cfg.data.mean), "std": list(cfg.data.std),
        "regime": cfg.method.regime, "source_workdir": str(workdir.absolute()),
        # P(fake) = softmax(head(feature) / temperature)[fake_class]; thresholds on that
        "temperature": rule.temperature, "decision": workdir_files.DECISION_JSON,
    })
    log.info("exported merged weights to %s (load with CLIPVisionModel.from_pretrained)", out)
    return out
