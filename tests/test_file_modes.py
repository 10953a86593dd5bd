"""Output files get the mode the user's umask gives a plain open(), not mkstemp's 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from flax import nnx

from fmsd_jax import atomic
from fmsd_jax.evaluators import result_files
from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig
from fmsd_jax.model.weights.export_hf import save_hf_clip_vision

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
    atomic.write_json(tmp_path / "a.json", {"x": 1})
    json_path, md_path = result_files.write_results(tmp_path, RESULT)
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


def test_claims_never_share_a_name_and_the_record_says_new_or_replaced(tmp_path):
    import threading

    atomic.forget_written()
    names, start = [], threading.Barrier(8)

    def claim():
        start.wait()  # all eight race for predictions.json at once
        names.append(atomic.claim_free_name(tmp_path / "predictions.json").name)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(names) == sorted(["predictions.json"] + [f"predictions-{n}.json"
                                                           for n in range(2, 9)])
    (tmp_path / "old.json").write_text("{}")
    atomic.write_json(tmp_path / "old.json", {"x": 1})
    atomic.write_json(tmp_path / "predictions-2.json", {"x": 2})  # fills a claim
    record = atomic.written()
    assert record[tmp_path / "old.json"] is True
    assert record[tmp_path / "predictions-2.json"] is False
    lines = atomic.describe_written(tmp_path)
    assert lines[0] == f"wrote 9 output(s), 8 new and 1 replacing an earlier file, in {tmp_path}:"
    assert "  replaced old.json" in lines and "  new      predictions-2.json" in lines
    (tmp_path / "predictions-8.json").unlink()
    (tmp_path / "predictions-7.json").unlink()
    lines = atomic.describe_written(tmp_path)
    gone = lines[-1].removeprefix("  removed since: ")  # in claim order, which threads race
    assert sorted(gone.split(", ")) == ["predictions-7.json", "predictions-8.json"]
    assert not any("predictions-8.json" in line for line in lines[:-1])
    atomic.forget_written()
    assert atomic.describe_written(tmp_path) == [f"wrote no file (in {tmp_path} or elsewhere)"]


def test_throughput_counts_training_steps_only(monkeypatch):
    from fmsd_jax.run import progress

    clock = iter([0.0, 1.0, 6.0, 7.0])  # start, pause 1..6 s (validation), report at 7 s
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    meter = progress.Progress(total_steps=40, start_step=0, batch_size=4)
    with meter.paused():
        pass
    line = meter.update(20, {"loss": 0.5})
    assert meter.steps_per_s == 10.0 and meter.images_per_s == 40.0  # 20 steps in 2 s
    assert line.startswith("step 20/40 | 10.00 steps/s 40.0 img/s | ETA 0:00:02")
