"""The deepfake detector: a CLIP vision tower and a linear head on its pooled feature.

The head's parameters are their own Variable type (`HeadParam`) so that training regimes are
Variable-type filters (DESIGN.md §2): FMSD trains `ArtifactFactor` + `HeadParam`, a linear
probe trains `HeadParam` only, full fine-tuning trains every `nnx.Param`.

The detector takes raw uint8 RGB pixels as well as normalised floats. The input pipeline ships
uint8 (a quarter of float32's bytes host-to-device, and no per-pixel float work on the host,
which is the scarce resource when decode and augmentation feed a fast accelerator); the
normalisation then runs on the device, fused by XLA into the patch embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fmsd_jax.model.vit import CLIPVisionTower


class HeadParam(nnx.Param):
    """A parameter of the classification head (always trained)."""


class Detector(nnx.Module):
    """logits = Linear(pooled CLIP feature); class 1 is 'fake' as in DeepfakeBench.

    Images are NHWC: uint8 RGB (normalised here with pixel_mean/pixel_std, given in [0, 1]
    units as in CLIP's preprocessing) or floats already normalised.
    """

    def __init__(self, backbone: CLIPVisionTower, *, num_classes: int = 2, rngs: nnx.Rngs,
                 pixel_mean: Sequence[float] | None = None,
                 pixel_std: Sequence[float] | None = None):
        self.backbone = backbone
        if (pixel_mean is None) != (pixel_std is None):
            raise ValueError("give both pixel_mean and pixel_std, or neither")
        # Static (part of the graph definition): x·scale + offset = (x/255 − mean) / std.
        self.pixel_scale = self.pixel_offset = None
        if pixel_mean is not None:
            mean, std = tuple(map(float, pixel_mean)), tuple(map(float, pixel_std))
            if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
                raise ValueError(f"pixel_mean/pixel_std must be 3 values (RGB) with std > 0, "
                                 f"got {mean} / {std}")
            self.pixel_scale = tuple(1.0 / (255.0 * s) for s in std)
            self.pixel_offset = tuple(-m / s for m, s in zip(mean, std, strict=True))
        width = backbone.cfg.width
        # torch.nn.Linear's default init, as in Effort's head.
        bound = width**-0.5
        self.head_kernel = HeadParam(
            jax.random.uniform(rngs.params(), (width, num_classes), jnp.float32, -bound, bound))
        self.head_bias = HeadParam(
            jax.random.uniform(rngs.params(), (num_classes,), jnp.float32, -bound, bound))

    def normalise(self, images: jax.Array) -> jax.Array:
        """uint8 pixels -> the tower's normalised float32 input; floats pass unchanged."""
        if images.dtype != jnp.uint8:
            return images
        if self.pixel_scale is None:
            raise ValueError("uint8 images need the detector's pixel_mean/pixel_std (build it "
                             "with Detector(..., pixel_mean=..., pixel_std=...)), or pass "
                             "normalised float images")
        return (images.astype(jnp.float32) * jnp.asarray(self.pixel_scale, jnp.float32)
                + jnp.asarray(self.pixel_offset, jnp.float32))

    def features(self, images: jax.Array) -> jax.Array:
        return self.backbone(self.normalise(images))

    def __call__(self, images: jax.Array) -> jax.Array:
        feats = self.features(images)
        return feats @ self.head_kernel[...] + self.head_bias[...]
