"""CLIP vision tower, detector head and checkpoint conversion."""

from fmsd_jax.model.checkpoint import (
    CheckpointError,
    assign_weights,
    load_clip_vision,
    read_clip_vision,
    save_hf_clip_vision,
)

__all__ = ["CheckpointError", "assign_weights", "load_clip_vision", "read_clip_vision",
           "save_hf_clip_vision"]
