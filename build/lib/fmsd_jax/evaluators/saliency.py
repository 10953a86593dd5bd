"""Where in the image the fake logit comes from: a patch-level map per scored image or frame.

The method is **integrated gradients on the patch embeddings** (Sundararajan et al., ICML
2017), from the baseline where every patch embedding is zero: for patch p with embedding e_p
(the tower's conv1 output, before the position embedding is added) and fake logit m (the
margin l1 − l0 of the uncalibrated logits),

    map_p = e_p · Σ_i w_i ∂m/∂e_p (α_i e),   α_i = t_i², w_i = 2 t_i / S, t_i = (i + ½)/S,

summed over channels (positive: the patch pushes towards 'fake'). The maps add up to
m(image) − m(baseline) up to the S-step quadrature's error (completeness; `completeness_gap`
reports it per image), so a map is a split of the logit's change among the patches, in logit
units. The baseline, all patch embeddings zero, is the image of CLIP's mean colour: the tower
then sees only its class token and position embeddings, no content.

Why the steps crowd near α = 0 (the midpoint rule in t with α = t²): there the patch tokens
α e_p + pos are dominated by the position embeddings and ln_pre's normalisation makes the
logit change fastest with α. Measured by `python bench/saliency_methods.py` on the trained box
detector of tests/test_saliency.py (largest gap over 32 images, as a share of the change):
α = t² leaves 13.9 % at S = 16 and 0.6 % at S = 32; evenly spaced α 56.4 % at 16 and 0.5 % at
64; 16 Gauss-Legendre nodes 24.7 %. Hence S = 32 (`config.predict.explain_steps`): the maps
then add up to the logit's change, at half the passes evenly spaced steps need.

Why this one, and not the cheaper alternatives:

* it is about *the fake logit*: attention rollout is class-agnostic (it follows the class
  token's attention whatever the head does with it) and so says what the tower looks at, not
  what drives 'fake';
* plain gradient × input (one backward pass) diluted the map too much to be read: on the box
  fixture (fakes carry a checkerboard in a 2×2-patch box, 25 % of the image) it put 46.7 % of
  the positive mass in the box and its largest patch in the box for 69 % of the fakes;
  |gradient| 35.5 % / 75 %; integrated gradients 89.1 % / 100 % (same bench, same detector
  and images; every integration rule above localises alike, they differ in completeness);
* it costs S forward and backward passes, run inside one jitted function (a scan over α, so
  memory is one pass's), built once per (graphdef, mesh, S) like scoring.make_predict_fn;
* it needs no hook inside the scanned blocks: CLIP's patch embedding is linear and has no
  bias (e_p = x_p·W_conv, so e(αx) = α e(x)), hence integrated gradients on the normalised
  pixels x from the zero baseline, summed over each patch's pixels, *is* integrated gradients
  on the patch embeddings, and the model code is unchanged.

Its limit: the map attributes the logit relative to a flat mean-colour image; it says how the
logit's change splits among patches along that path, not what removing one patch would do.

Maps are written as PNG overlays (`write_overlays`): the positive part of the map, scaled by
the map's largest |patch score|, in a heat colour map over the scored crop (patch-sized
blocks, nearest-neighbour: the map's resolution is the patch grid, and smoothing it would
show detail it does not have).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib import colormaps
from PIL import Image

from fmsd_jax import atomic, parallel
from fmsd_jax.evaluators.scoring import _process_local
from fmsd_jax.parallel import on_mesh
from fmsd_jax.pathnames import shown

OVERLAY_ALPHA = 0.6  # heat opacity at a patch with the image's largest score
COLOUR_MAP = "inferno"  # perceptually uniform, dark at 0: a zero patch leaves the image visible


@functools.lru_cache(maxsize=8)
def make_saliency_fn(graphdef: Any, mesh, steps: int) -> Any:
    """jit(trainable, frozen, images uint8 (B, H, W, 3)) → {'map': (B, grid_h, grid_w)
    float32 integrated gradients per patch, 'logit': (B,) the fake logit at the image,
    'baseline_logit': (B,) at the zero-embedding baseline}, batch split over the mesh. One
    jitted function per (run's graphdef, mesh, steps): every batch of a predict command
    reuses one compiled program."""
    if steps < 1:
        raise ValueError(f"integrated gradients need steps >= 1, got {steps}")

    def saliency(trainable, frozen, images):
        model = nnx.merge(graphdef, trainable, frozen)
        x = model.normalise(images).astype(jnp.float32)

        def margin(z):
            logits = model(z).astype(jnp.float32)
            m = logits[:, 1] - logits[:, 0]
            return jnp.sum(m), m  # images do not interact: grad of the sum is per image

        grad = jax.grad(margin, has_aux=True)

        def accumulate(total, node):
            alpha, weight = node
            g, _ = grad(alpha * x)
            return total + weight * g, None

        t = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
        total, _ = jax.lax.scan(accumulate, jnp.zeros_like(x), (t * t, 2.0 * t / steps))
        p = model.backbone.cfg.patch_size
        b, h, w, c = x.shape
        attribution = (total * x).reshape(b, h // p, p, w // p, p, c)
        return {"map": jnp.sum(attribution, axis=(2, 4, 5)), "logit": margin(x)[1],
                "baseline_logit": margin(jnp.zeros_like(x))[1]}

    return jax.jit(on_mesh(saliency, mesh), out_shardings=parallel.batch_sharding(mesh))


def saliency_maps(run: Any, trainable: Any, images: jax.Array, steps: int
                  ) -> dict[str, np.ndarray]:
    """`make_saliency_fn`'s outputs for one device batch, on the host (this process's rows)."""
    out = make_saliency_fn(run.graphdef, run.mesh, int(steps))(trainable, run.frozen, images)
    return {k: _host_rows(v) for k, v in out.items()}


def completeness_gap(out: dict[str, np.ndarray]) -> np.ndarray:
    """(B,) Σ_p map_p − (logit − baseline_logit), in logit units: how far the S-step sum is
    from the change it splits. Large where the logit jumps along the path (a saturated
    detector); more `config.predict.explain_steps` shrink it (module docstring)."""
    m = np.asarray(out["map"], np.float64)
    return m.sum(axis=(1, 2)) - (np.asarray(out["logit"], np.float64)
                                 - np.asarray(out["baseline_logit"], np.float64))


def positive_share(maps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(B,) share of each map's positive mass that falls where `boxes` (B, grid_h, grid_w,
    bool) is True; NaN for a map with no positive mass."""
    pos = np.maximum(np.asarray(maps, np.float64), 0.0)
    total = pos.sum(axis=(1, 2))
    inside = (pos * np.asarray(boxes, bool)).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)


def overlay(image: np.ndarray, patch_map: np.ndarray, scale: float | None = None) -> np.ndarray:
    """(H, W, 3) uint8: `image` with the positive part of `patch_map` as heat over it, full
    colour at `scale` (logit units; default: the map's largest |score|, positive or negative,
    so a real image whose patches mostly push towards 'real' shows faint heat, not the full
    colour its largest positive patch would get if scaled on its own). Pass one scale for
    several images to compare them on one colour scale."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    gh, gw = patch_map.shape
    if h % gh or w % gw:
        raise ValueError(f"a {gh}x{gw} map does not tile a {h}x{w} image")
    patch_map = np.asarray(patch_map, np.float64)
    peak = float(np.abs(patch_map).max()) if scale is None else float(scale)
    heat = np.clip(patch_map / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(patch_map)
    heat = np.repeat(np.repeat(heat, h // gh, axis=0), w // gw, axis=1)
    colour = colormaps[COLOUR_MAP](heat)[..., :3] * 255.0
    a = (OVERLAY_ALPHA * heat)[..., None]
    return np.clip(np.rint((1 - a) * image + a * colour), 0, 255).astype(np.uint8)


def overlay_name(name: str) -> str:
    """A safe PNG file name for an input (a path as given, perhaps with '#frame'): its last
    path part with every character outside [A-Za-z0-9._-] as '_' (undecodable bytes first
    shown as \\xNN), cut to 80 characters, and 10 hex digits of the SHA-1 of the whole name's
    bytes, so two inputs of one base name (a/x.png, b/x.png) never share a file."""
    raw = os.fsencode(name) if isinstance(name, str) else bytes(name)
    base = re.sub(r"[^A-Za-z0-9._-]", "_", shown(os.path.basename(os.fsdecode(raw)) or "input"))
    base = base.lstrip(".")[:80] or "input"
    return f"{base}-{hashlib.sha1(raw).hexdigest()[:10]}.png"


def overlay_dir(predictions_path: str | os.PathLike) -> Path:
    """Where a predict command's overlays go: beside its predictions file, in a folder named
    after it (predictions.json → predictions.saliency/), so two commands' maps never mix."""
    p = Path(predictions_path)
    return p.with_name(p.stem + ".saliency")


def write_overlays(images: np.ndarray, maps: np.ndarray, out_dir: str | os.PathLike,
                   names: Sequence[str], scale: float | None = None) -> list[Path]:
    """One PNG overlay per image in `out_dir` (made if missing), named by `overlay_name` of
    each of `names` (the inputs the images came from); each written atomically. `scale`: as
    in `overlay` (default: each map its own). Returns the paths, in order."""
    images, maps = np.asarray(images), np.asarray(maps)
    if not (len(images) == len(maps) == len(names)):
        raise ValueError(f"{len(images)} images, {len(maps)} maps and {len(names)} names")
    files = [overlay_name(n) for n in names]
    if len(set(files)) != len(files):
        raise ValueError("two overlays would share a file name: give each image its own name "
                         "(e.g. 'video.mp4#12' for a frame)")
    out = []
    for image, patch_map, file in zip(images, maps, files, strict=True):
        path = Path(out_dir) / file
        with atomic.replacing(path) as tmp:
            Image.fromarray(overlay(image, patch_map, scale)).save(tmp, format="PNG")
        out.append(path)
    return out


def _host_rows(global_array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in order."""
    return np.asarray(global_array) if jax.process_count() == 1 else _process_local(global_array)
