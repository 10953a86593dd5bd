"""The CLIP vision tower (`vit`, built from `layers`), the detector head (`detector`) and
CLIP weights in and out (`weights/`)."""
