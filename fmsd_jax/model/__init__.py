"""CLIP vision tower, detector head and checkpoint conversion."""
