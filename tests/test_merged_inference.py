"""The four inference paths bench/merged_inference.py times compute one function: a tiny trained
FMSD run scored by predict's decomposed detector, by the same detector merged to dense weights,
by PyTorch eager on `--mode export`'s folder and by ONNX Runtime on that model exported, on the
same uint8 images. The bench's speed table means nothing unless these agree, and the check is
sharp: the same export with the pretrained tower in place of the merged one is far off.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_cfg

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _inference_paths as paths  # noqa: E402
from fmsd_jax.modes import export, train  # noqa: E402

TOL = 1e-5  # fp32 on both sides; measured about 2e-7 on this model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_clip_checkpoint, tiny_benchmark):
    """A 2-step FMSD run at lr 2e-2 (its factors move, so the merge is not a no-op), exported."""
    root = tmp_path_factory.mktemp("merged_inference")
    cfg = make_cfg(tiny_clip_checkpoint, tiny_benchmark,
                   **{"train.total_steps": "2", "optim.lr": "0.02"})
    cfg.method.mask.enabled = False  # all layers adapted: no mask estimation to wait for
    cfg.train.eval_after_training = False
    train.train(cfg, root / "workdir")
    out = export.export(cfg, root / "workdir", root / "export")
    return cfg, root, out


def test_run_config_reads_back_the_config_training_used(exported):
    cfg, root, _ = exported
    assert paths.run_config(root / "workdir").to_dict() == cfg.to_dict()


def test_decomposed_merged_torch_and_onnx_give_the_same_p_fake(exported, tiny_clip_checkpoint):
    cfg, root, out = exported
    images = np.random.default_rng(3).integers(0, 256, (6, 32, 32, 3), np.uint8)
    ours = paths.jax_paths(root / "workdir")
    module = paths.torch_module(out)
    onnx = paths.onnx_path(paths.export_onnx(module, root / "onnx", 32), threads=1)
    ref = ours["decomposed"](images)
    assert ref.shape == (6,) and np.all((ref > 0) & (ref < 1))
    for name, got in (("merged", ours["merged"](images)),
                      ("torch", paths.torch_path(module)(images)), ("onnx", onnx(images))):
        np.testing.assert_allclose(got, ref, atol=TOL, rtol=0, err_msg=name)
    # The ONNX file's batch dimension is dynamic: one image scores as in a batch.
    np.testing.assert_allclose(onnx(images[:1]), ref[:1], atol=TOL, rtol=0)

    # Sharpness: the exported head on the pretrained tower (no merged artifact subspaces)
    # misses by far more than TOL, so agreement above says the merged weights were carried.
    pretrained = paths.torch_module(out)
    pretrained.tower = type(pretrained.tower).from_pretrained(str(tiny_clip_checkpoint.parent))
    assert np.abs(paths.torch_path(pretrained)(images) - ref).max() > 100 * TOL
