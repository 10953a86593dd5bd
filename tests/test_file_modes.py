"""Output files get the mode the user's umask gives a plain open(), not mkstemp's 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from flax import nnx

from fmsd_jax import atomic, checkpointing, report
from fmsd_jax.model.checkpoint import save_hf_clip_vision
from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig

RESULT = {"SynBlend": {"frame_auc": 0.5, "video_auc": 0.5, "acc": 0.5, "ap": 0.5, "eer": 0.5,
                       "num_frames": 4, "num_videos": 2}}


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_atomic_writer_respects_the_umask(tmp_path, umask):
    assert atomic.current_umask() == umask
    checkpointing.write_json_atomic(tmp_path / "a.json", {"x": 1})
    json_path, md_path = report.write_results(tmp_path, RESULT)
    cfg = ViTConfig(width=16, layers=1, heads=2, patch_size=8, mlp_dim=32, proj_dim=None,
                    image_size=16)
    save_hf_clip_vision(CLIPVisionTower(cfg, rngs=nnx.Rngs(0)), tmp_path / "hf")
    written = [tmp_path / "a.json", json_path, md_path, tmp_path / "hf" / "model.safetensors",
               tmp_path / "hf" / "config.json"]
    assert {p.name: oct(mode(p)) for p in written} == {p.name: oct(0o666 & ~umask)
                                                        for p in written}
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary file left behind


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic.replacing(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
