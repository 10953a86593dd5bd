"""The deepfake detector: a CLIP vision tower and a linear head on its pooled feature.

The head's parameters are their own Variable type (`HeadParam`) so that training regimes are
Variable-type filters (DESIGN.md §2): FMSD trains `ArtifactFactor` + `HeadParam`, a linear
probe trains `HeadParam` only, full fine-tuning trains every `nnx.Param`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fmsd_jax.model.vit import CLIPVisionTower


class HeadParam(nnx.Param):
    """A parameter of the classification head (always trained)."""


class Detector(nnx.Module):
    """logits = Linear(pooled CLIP feature); class 1 is 'fake' as in DeepfakeBench."""

    def __init__(self, backbone: CLIPVisionTower, *, num_classes: int = 2, rngs: nnx.Rngs):
        self.backbone = backbone
        width = backbone.cfg.width
        # torch.nn.Linear's default init, as in Effort's head.
        bound = width**-0.5
        self.head_kernel = HeadParam(
            jax.random.uniform(rngs.params(), (width, num_classes), jnp.float32, -bound, bound))
        self.head_bias = HeadParam(
            jax.random.uniform(rngs.params(), (num_classes,), jnp.float32, -bound, bound))

    def features(self, images: jax.Array) -> jax.Array:
        return self.backbone(images)

    def __call__(self, images: jax.Array) -> jax.Array:
        feats = self.features(images)
        return feats @ self.head_kernel[...] + self.head_bias[...]
