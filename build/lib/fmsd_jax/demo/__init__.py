"""The offline demo (configs/demo.py): its recipe (data, pretrained backbone, four
methods trained and compared: `recipe`), the backbone's pretraining (`pretrain`), the
learning-rate sweep (`sweep`), the report (`report`) and its robustness section
(`robustness_section`). Kept out of the library proper; nothing below imports it.

This file stays light (configs/demo.py imports METHODS from it)."""

from __future__ import annotations

METHODS = ("fmsd", "effort", "full", "linear_probe")


# The learning-rate sweep's folder in the demo's root (`configs/demo.py:sweep`)
SWEEP_DIR = "sweep"
SWEEP_JSON = "sweep.json"
