"""Session-wide setup (jax starts as the CLI starts it) and fixtures: a tiny CLIP checkpoint
in Hugging Face's format and a tiny synthetic benchmark in DeepfakeBench's layout, both made
by the tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config) -> None:
    """Tests start jax as the CLI does: without libtpu's runtime where no TPU chip is (its
    warnings would fill every failure's captured output; `--mode plan`'s compiles still load
    libtpu as a compiler)."""
    from fmsd_jax import platforms

    platforms.skip_absent_tpu()


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
