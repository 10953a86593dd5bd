"""The patch maps of evaluators/saliency.py: on a detector trained to find an artifact that
sits in a known box, the map puts its mass in the box; the maps add up to the logit's change
(integrated gradients' completeness); the overlays are PNGs named safely after their inputs.

The detector is conftest's `train_box_detector`: the tiny CLIP geometry (32 px, patch 8, a
4×4 grid), trained for 30 Adam steps on `box_images`: smooth random images (real) and the
same kind of image with a ±25 checkerboard added in a 16×16 box at a random patch-aligned
place (fake). The box covers 4 of 16 patches, so a map that ignored where the artifact is
would put about 25 % of its mass there. `bench/saliency_methods.py` compares other map
methods on the same fixture."""

from __future__ import annotations

import os

import chex
import numpy as np
import pytest
from conftest import (
    BOX,
    GRID,
    LATIN1,
    PATCH,
    SIZE,
    box_images,
    byte_path,
    counting_compiles,
    make_cfg,
    train_box_detector,
)
from flax import nnx
from PIL import Image
from sklearn.metrics import roc_auc_score

from fmsd_jax import parallel
from fmsd_jax.evaluators import saliency
from fmsd_jax.run import rebuild

STEPS = 32  # integrated gradients' steps (config.predict.explain_steps' default)


@pytest.fixture(scope="module")
def trained():
    """(graphdef, trainable, frozen, mesh, initial trainable) of conftest's box detector."""
    return train_box_detector()


def maps_of(trained, images: np.ndarray, initial: bool = False) -> dict[str, np.ndarray]:
    graphdef, trainable, frozen, mesh, untrained = trained
    trainable = untrained if initial else trainable
    fn = saliency.make_saliency_fn(graphdef, mesh, STEPS)
    batch = parallel.global_batch(mesh, {"image": images}, ("image",))["image"]
    return {k: np.asarray(v) for k, v in fn(trainable, frozen, batch).items()}


def test_map_mass_falls_in_the_artifact_box(trained):
    images, labels, boxes = box_images(32, np.random.default_rng(1))  # unseen images
    calls: list[int] = []
    out = counting_compiles(maps_of, calls)(trained, images)
    counting_compiles(maps_of, calls)(trained, box_images(32, np.random.default_rng(5))[0])
    assert calls[1] == 0  # one compiled program for every batch of this shape
    chex.assert_shape(out["map"], (32, GRID, GRID))
    # The detector found the artifact, or the maps could show nothing about it.
    assert roc_auc_score(labels, out["logit"]) > 0.95
    fake = labels == 1
    share = saliency.positive_share(out["map"][fake], boxes[fake])
    box_share = BOX**2 / GRID**2
    assert np.nanmean(share) > box_share + 0.3, (np.nanmean(share), box_share)  # measured 0.90
    peak_in_box = [b.reshape(-1)[np.argmax(m)] for m, b in zip(out["map"][fake], boxes[fake],
                                                                strict=True)]
    assert np.mean(peak_in_box) >= 0.9
    # Rows and columns mixed up: the maps' mass leaves every box off the diagonal, so the
    # share drops; the checks above would catch a transposed map.
    flipped = saliency.positive_share(out["map"][fake].transpose(0, 2, 1), boxes[fake])
    assert np.nanmean(flipped) < np.nanmean(share) - 0.2


def test_maps_add_up_to_the_logit_change(trained):
    """Completeness: Σ_p map_p = m(image) − m(baseline), up to the 32-step quadrature's error.

    Untrained detector: within 1 % of the largest change (measured 0.09 %). Trained detector
    (saturated, its logit changes sharply along the path): within 1 % of each image's change
    (measured 0.2 %; at 16 steps α = t² gives ~14 % and evenly spaced α ~56 %, see
    bench/saliency_methods.py). A map scaled or weighted wrongly misses by far more."""
    images, _, _ = box_images(32, np.random.default_rng(2))  # the shape compiled above
    for initial, rtol in ((True, None), (False, 0.01)):
        out = maps_of(trained, images, initial=initial)
        change = (out["logit"] - out["baseline_logit"]).astype(np.float64)
        gap = saliency.completeness_gap(out)
        np.testing.assert_allclose(gap, out["map"].sum(axis=(1, 2)) - change, atol=1e-5)
        assert np.abs(change).min() > 1e-3  # a change worth splitting
        if rtol is None:
            assert np.abs(gap).max() < 0.01 * np.abs(change).max(), (gap, change)
        else:
            assert np.max(np.abs(gap) / np.abs(change)) < rtol, (gap, change)


def test_maps_of_a_decomposed_run(tiny_clip_checkpoint, tmp_path):
    """On a run as the modes open it (FMSD-decomposed tiny CLIP: scanned blocks, remat, the
    artifact path's custom VJP), the map explains the logit the detector gives, and adds up
    to its change from the baseline (within 1 % of the largest change). No data is read."""
    cfg = make_cfg(tiny_clip_checkpoint, tmp_path / "no-data")
    cfg.method.mask.enabled = False
    run = rebuild.open_run(cfg, tmp_path / "wd", parallel.make_mesh(cfg.mesh), estimate=False)
    images = np.random.default_rng(6).integers(0, 256, (8, SIZE, SIZE, 3), np.uint8)
    batch = parallel.global_batch(run.mesh, {"image": images}, ("image",))["image"]
    out = saliency.saliency_maps(run, run.trainable, batch, STEPS)
    chex.assert_shape(out["map"], (8, GRID, GRID))
    logits = np.asarray(nnx.merge(run.graphdef, run.trainable, run.frozen)(batch))
    np.testing.assert_allclose(out["logit"], logits[:, 1] - logits[:, 0], rtol=0, atol=1e-5)
    change = out["logit"] - out["baseline_logit"]
    assert np.abs(saliency.completeness_gap(out)).max() < 0.01 * np.abs(change).max()


def test_one_function_per_run_and_steps(trained):
    graphdef, _, _, mesh, _ = trained
    fn = saliency.make_saliency_fn(graphdef, mesh, STEPS)
    assert saliency.make_saliency_fn(graphdef, mesh, STEPS) is fn
    assert saliency.make_saliency_fn(graphdef, mesh, 2 * STEPS) is not fn
    with pytest.raises(ValueError, match="steps >= 1"):
        saliency.make_saliency_fn(graphdef, mesh, 0)


def test_overlays_are_pngs_named_after_their_inputs(tmp_path):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (4, SIZE, SIZE, 3), np.uint8)
    maps = np.zeros((4, GRID, GRID), np.float32)
    maps[:, 1, 2] = 3.0  # the peak
    maps[:, 0, 0] = -2.0  # pushes towards 'real': not drawn
    maps[:, 3, 3] = 1.5  # half the peak
    odd = byte_path(tmp_path, b"caf" + LATIN1 + b".png")
    names = [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png"), odd,
             "clip.mp4#12"]
    out_dir = saliency.overlay_dir(tmp_path / "predictions.json")
    paths = saliency.write_overlays(images, maps, out_dir, names)
    assert out_dir == tmp_path / "predictions.saliency"
    assert [p.parent for p in paths] == [out_dir] * 4
    assert sorted(os.listdir(out_dir)) == sorted(p.name for p in paths)  # no temporaries left
    assert len({p.name for p in paths}) == 4  # a/x.png and b/x.png do not collide
    for p in paths:
        p.name.encode("ascii")  # safe everywhere
        assert p.suffix == ".png"
    # folder_file: a video's frames (test_0000/000.png) say which video they are of
    tmp = tmp_path.name
    assert paths[0].name.startswith("a_x.png-") and paths[1].name.startswith("b_x.png-")
    assert paths[2].name.startswith(f"{tmp}_caf_xe9.png-")
    assert paths[3].name.startswith("clip.mp4_12-")
    for image, path in zip(images, paths, strict=True):
        got = np.asarray(Image.open(path).convert("RGB"))
        chex.assert_shape(got, (SIZE, SIZE, 3))
        # No positive score (the negative and the zero patches): the image unchanged.
        np.testing.assert_array_equal(got[:PATCH, :PATCH], image[:PATCH, :PATCH])
        np.testing.assert_array_equal(got[PATCH:2 * PATCH, :PATCH], image[PATCH:2 * PATCH, :PATCH])
        # The peak is blended at OVERLAY_ALPHA, half the peak at half of it.
        peak = got[PATCH:2 * PATCH, 2 * PATCH:3 * PATCH].astype(float)
        half = got[3 * PATCH:, 3 * PATCH:].astype(float)
        orig_peak = image[PATCH:2 * PATCH, 2 * PATCH:3 * PATCH].astype(float)
        colour = (peak - (1 - saliency.OVERLAY_ALPHA) * orig_peak) / saliency.OVERLAY_ALPHA
        assert np.ptp(colour.reshape(-1, 3), axis=0).max() <= 2.0  # one flat colour
        assert np.abs(half - image[3 * PATCH:, 3 * PATCH:]).mean() > 1.0
    # A map that mostly pushes towards 'real' (largest |score| negative) shows faint heat;
    # one scale for every image (scale=1: its positive patch is at full colour) shows more.
    real_like = np.zeros((GRID, GRID), np.float32)
    real_like[0, 0], real_like[2, 2] = 1.0, -4.0
    patch = (slice(0, PATCH), slice(0, PATCH))
    faint = saliency.overlay(images[0], real_like)[patch].astype(float)
    full = saliency.overlay(images[0], real_like, scale=1.0)[patch].astype(float)
    orig = images[0][patch].astype(float)
    assert 0 < np.abs(faint - orig).mean() < 0.5 * np.abs(full - orig).mean()
    with pytest.raises(ValueError, match="share a file name"):
        saliency.write_overlays(images[:2], maps[:2], out_dir, ["same", "same"])
