"""Session-wide setup (jax starts as the CLI starts it), fixtures (a tiny CLIP checkpoint in
Hugging Face's format and a tiny synthetic benchmark in DeepfakeBench's layout, both made by
the tests: nothing is downloaded) and the helpers several test modules use.

The helpers live here, not in a test module, so that no test module imports another: a test
module imports them with `from conftest import ...` (pytest puts tests/ on sys.path), and a
script a test runs in a fresh process does the same after `sys.path.insert(0, tests)`.
Importing this module starts no jax backend.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Session setup


def pytest_configure(config: pytest.Config) -> None:
    """Tests start jax as the CLI does: without libtpu's runtime where no TPU chip is (its
    warnings would fill every failure's captured output; `--mode plan`'s compiles still load
    libtpu as a compiler)."""
    from fmsd_jax import platforms

    platforms.skip_absent_tpu()


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory) -> Path:
    """A random tiny CLIP vision tower written as HF `model.safetensors` + `config.json`."""
    from flax import nnx

    from fmsd_jax.model.checkpoint import save_hf_clip_vision
    from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig

    out = tmp_path_factory.mktemp("tiny_clip")
    cfg = ViTConfig(width=32, layers=2, heads=2, patch_size=8, mlp_dim=64, proj_dim=None,
                    image_size=32)
    save_hf_clip_vision(CLIPVisionTower(cfg, rngs=nnx.Rngs(7)), out)
    return out / "model.safetensors"


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory) -> Path:
    """The synthetic cross-forgery benchmark at its `tiny` size."""
    from fmsd_jax.data.synthetic import write_benchmark

    out = tmp_path_factory.mktemp("synthetic")
    write_benchmark(out, size="tiny", seed=0)
    return out


# ---------------------------------------------------------------------------------------------
# Counting XLA compiles: jax reports each backend compile as a monitoring event, so a test can
# say how many compiles a call made (compiled once = the second call makes none).

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_COMPILES: list[str] = []  # every XLA backend compile of this test process, in order
_listening = False


def _listen_for_compiles() -> None:
    global _listening
    if not _listening:
        import jax

        jax.monitoring.register_event_duration_secs_listener(
            lambda event, _secs, **_: _COMPILES.append(event) if event == COMPILE_EVENT
            else None)
        _listening = True


def counting_compiles(fn: Callable, calls: list[int]) -> Callable:
    """`fn`, appending to `calls` how many compiles each of its calls made."""
    _listen_for_compiles()

    def counted(*args, **kwargs):
        before = len(_COMPILES)
        try:
            return fn(*args, **kwargs)
        finally:
            calls.append(len(_COMPILES) - before)
    return counted


# ---------------------------------------------------------------------------------------------
# The method layer's settings and the production train step on a small detector


def optim_settings(**changes: Any):
    """config_base's `optim` defaults as an OptimConfig, with `changes`: a test states only what
    it varies, and the rest is what a run uses."""
    import dataclasses

    from fmsd_jax import assemble, config_base

    return dataclasses.replace(assemble.optim_section(config_base.base_config()), **changes)


def objective_settings(**changes: Any):
    """config_base's objective defaults (`method.lambda_*`, `spectral_form`) with `changes`."""
    import dataclasses

    from fmsd_jax import assemble, config_base

    return dataclasses.replace(assemble.objective_section(config_base.base_config()), **changes)


def production_step(det, *, regime: str, spec, batch: dict, **kwargs: Any):
    """`train.make_train_step` on `det`, on a one-device mesh, as bench/_common.ProductionStep
    builds it for the benches (one construction for both); kwargs go to ProductionStep."""
    import jax

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench._common import ProductionStep

    n, size = batch["image"].shape[:2]
    return ProductionStep(det, regime=regime, spec=spec, batch=n, image_size=size,
                          devices=jax.devices()[:1], **kwargs)
