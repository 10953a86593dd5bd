"""fmsd_jax: FMSD generalisable deepfake detection in JAX / Flax NNX."""

__version__ = "0.1.0"
