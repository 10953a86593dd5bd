"""`--mode preprocess` on tiny raw trees in FaceForensics++'s and Celeb-DF-v2's official layouts,
made here from the bundled photographs (pans, small turns, fakes by pasting one face onto
another), then training `configs/clip_b16.py:runlocal` on the output and evaluating it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, face_photos, make_cfg, one_line_error, paste_face, run_cli
from conftest import write_face_video as _write

from fmsd_jax import errors
from fmsd_jax.data import faces, raw_videos
from fmsd_jax.modes import evaluate, predict, preprocess, train
from fmsd_jax.run import workdir_files as wf

FRAMES = 6  # per raw video
NUM_FRAMES = 3  # sampled by preprocess (DeepfakeBench's linspace: frames 0, 2, 5)


@pytest.fixture(scope="module")
def stills():
    """Four faces (two photographs and their mirror images), their centres, and four fakes
    (face i+1 pasted onto face i)."""
    import cv2

    cropper = faces.FaceCropper()
    # Half size: faces of 44 and 108 px, as small as dlib's HOG (with one upsample) finds.
    photos = [cv2.resize(p, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
              for p in face_photos().values()]
    real = photos
    fake = [paste_face(photos[i], photos[(i + 1) % 4], cropper) for i in range(4)]

    def centre(image):
        b = cropper.crop(image).box
        return ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)

    return [(r, centre(r)) for r in real], [(f, centre(f)) for f in fake]


def write_video(path, still_centre, k: int, n: int = FRAMES) -> None:
    still, centre = still_centre
    _write(path, still, centre, n=n, size=(160, 160), zoom=1.0, pan=(2.0 - k, 1.0),
           turn=(-1) ** k * 1.5)


def no_face_video(path) -> None:
    import skimage.data

    coffee = skimage.data.coffee()
    _write(path, coffee, (300, 200), n=FRAMES, size=(160, 160), zoom=0.5)


@pytest.fixture(scope="module")
def raw_ffpp(tmp_path_factory, stills):
    """FaceForensics++'s layout at c23: six real videos, their six fakes (Deepfakes), one
    fake with no face, a 0-byte and a corrupt video, and a video in no split file."""
    root = tmp_path_factory.mktemp("raw") / "FaceForensics++"
    real, fake = stills
    reals = root / "original_sequences" / "youtube" / "c23" / "videos"
    fakes = root / "manipulated_sequences" / "Deepfakes" / "c23" / "videos"
    pairs = [("000", "001"), ("002", "003"), ("004", "005")]
    for k, (a, b) in enumerate(pairs):
        for j, (t, s) in enumerate(((a, b), (b, a))):
            i = 2 * k + j
            write_video(reals / f"{t}.mp4", real[i % 4], i)
            write_video(fakes / f"{t}_{s}.mp4", fake[i % 4], i + 1)
    no_face_video(fakes / "006_007.mp4")
    (reals / "006.mp4").write_bytes(b"")
    (reals / "007.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    write_video(reals / "999.mp4", real[0], 0, n=2)
    for split, ps in (("train", [pairs[0]]), ("val", [pairs[1]]),
                      ("test", [pairs[2], ("006", "007")])):
        (root / f"{split}.json").write_text(json.dumps([list(p) for p in ps]))
    return root


@pytest.fixture(scope="module")
def raw_cdf(tmp_path_factory, stills):
    """Celeb-DF-v2's layout: two Celeb-real, one YouTube-real, two Celeb-synthesis videos;
    one of each kind on the test list."""
    root = tmp_path_factory.mktemp("raw") / "Celeb-DF-v2"
    real, fake = stills
    write_video(root / "Celeb-real" / "id0_0000.mp4", real[0], 0)
    write_video(root / "Celeb-real" / "id1_0000.mp4", real[1], 1)
    write_video(root / "YouTube-real" / "00000.mp4", real[2], 2)
    write_video(root / "Celeb-synthesis" / "id0_id1_0000.mp4", fake[0], 3)
    write_video(root / "Celeb-synthesis" / "id1_id0_0000.mp4", fake[1], 0)
    (root / raw_videos.CDF2_TEST_LIST).write_text(
        "1 YouTube-real/00000.mp4\n0 Celeb-synthesis/id1_id0_0000.mp4\n")
    return root


def pre_cfg(ckpt, out, raw, workers: int = 1, **extra: str):
    return make_cfg(ckpt, out, **{"preprocess.raw_root": str(raw),
                                  "preprocess.num_frames": str(NUM_FRAMES),
                                  "preprocess.workers": str(workers), **extra})


def cli_args(out: Path, ckpt: Path, raw: Path, workers: int = 1) -> list[str]:
    return ["--config", "configs/clip_b16.py:runlocal", f"--workdir={out}", "--mode=preprocess",
            f"--config.model.init_from={ckpt}", f"--config.preprocess.raw_root={raw}",
            f"--config.preprocess.num_frames={NUM_FRAMES}",
            f"--config.preprocess.workers={workers}"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory, tiny_clip_checkpoint, raw_ffpp, raw_cdf):
    """Both raw trees preprocessed into one DeepfakeBench root: FaceForensics++ by the CLI on
    two processes (it skips three videos, so it exits 2), Celeb-DF-v2 in-process."""
    out = tmp_path_factory.mktemp("dfb")
    proc = run_cli(*cli_args(out, tiny_clip_checkpoint, raw_ffpp, workers=2))
    cdf = preprocess.preprocess(pre_cfg(tiny_clip_checkpoint, out, raw_cdf), out)
    return out, proc, cdf


def test_ffpp_is_written_in_deepfakebench_layout_and_skips_are_named(tree, raw_ffpp):
    out, proc, _ = tree
    line = one_line_error(proc)
    assert "preprocess skipped 4 of 16 videos: 1 with no face" in line
    for name in ("006.mp4 (0-byte file)", "007.mp4 (no decodable frame)", "999.mp4 (in no "
                 "split file)", "holds the 12 others"):
        assert name in line, line
    assert "preprocess: 15/15 videos" in proc.stdout and "ETA 0:00:00" in proc.stdout
    summary = json.loads((out / "FaceForensics++" / wf.PREPROCESS_SUMMARY_JSON).read_text())
    assert (summary["done"], summary["no_face"], len(summary["unreadable"])) == (12, 1, 2)
    assert summary["frames_stored"] == 12 * NUM_FRAMES
    assert summary["this_run"]["processes"] == 2 and summary["this_run"]["frames_per_s"] > 0
    no_face = (out / "FaceForensics++" / wf.NO_FACE_TXT).read_text().splitlines()
    assert no_face == [f"{raw_ffpp}/manipulated_sequences/Deepfakes/c23/videos/006_007.mp4\t"
                       f"{NUM_FRAMES} frames decoded, none with a face"]
    data = json.loads((out / wf.DATASET_JSON_DIR / "FaceForensics++.json").read_text())
    groups = data["FaceForensics++"]
    assert sorted(groups) == ["FF-DF", "FF-real"]
    assert sorted(groups["FF-real"]["train"]["c23"]) == ["000", "001"]
    assert sorted(groups["FF-DF"]["val"]["c23"]) == ["002_003", "003_002"]
    assert sorted(groups["FF-DF"]["test"]["c23"]) == ["004_005", "005_004"]  # 006_007: no face
    frames = groups["FF-DF"]["train"]["c23"]["000_001"]["frames"]
    assert frames == [f"FaceForensics++/manipulated_sequences/Deepfakes/c23/frames/000_001/"
                      f"{i:03d}.png" for i in (0, 2, 5)]  # np.linspace(0, 5, 3) as ints
    import cv2

    crop = cv2.imread(str(out / frames[0]))
    assert crop.shape == (256, 256, 3)
    marks = np.load(out / frames[0].replace("frames", "landmarks").replace(".png", ".npy"))
    assert marks.shape == (68, 2) and 0 < marks.min() and marks.max() < 256
    # The stored crop is the face cut from the decoded frame, as faces.FaceCropper cuts it.
    from fmsd_jax.data import video

    frame = video.read_frame(str(raw_ffpp / "manipulated_sequences" / "Deepfakes" / "c23" /
                                 "videos" / "000_001.mp4"), 0)
    again = faces.FaceCropper().crop(frame)
    np.testing.assert_array_equal(crop[..., ::-1], again.image)
    np.testing.assert_allclose(marks, again.crop_landmarks)
    # nothing was written into the raw tree
    assert not list(raw_ffpp.rglob("frames")) and not list(raw_ffpp.rglob("*.png"))


def test_celeb_df_splits_follow_its_test_list(tree):
    out, _, summary = tree
    assert (summary["done"], summary["no_face"], summary["unreadable"]) == (5, 0, {})
    groups = json.loads((out / wf.DATASET_JSON_DIR / "Celeb-DF-v2.json").read_text())[
        "Celeb-DF-v2"]
    assert sorted(groups["CelebDFv2_real"]["test"]) == ["00000"]
    assert groups["CelebDFv2_real"]["val"] == groups["CelebDFv2_real"]["test"]
    assert sorted(groups["CelebDFv2_real"]["train"]) == ["id0_0000", "id1_0000"]
    assert sorted(groups["CelebDFv2_fake"]["train"]) == ["id0_id1_0000"]
    assert sorted(groups["CelebDFv2_fake"]["test"]) == ["id1_id0_0000"]


@pytest.mark.slow  # a training run
def test_train_runlocal_on_the_preprocessed_tree_then_evaluate(tree, tiny_clip_checkpoint,
                                                                tmp_path, raw_ffpp):
    """configs/clip_b16.py unchanged: FF++ c23 (its train and val splits) → Celeb-DF-v2 test;
    then predict scores a raw video through the same face crop and names one without."""
    out, _, _ = tree
    cfg = make_cfg(tiny_clip_checkpoint, out, **{"data.train_dataset": "('FaceForensics++',)",
                                                 "data.test_dataset": "('Celeb-DF-v2',)"})
    workdir = tmp_path / "run"
    results = train.train(cfg, workdir)
    again = evaluate.evaluate(cfg, workdir)
    for res in (results, again):
        cdf = res["Celeb-DF-v2"]
        assert cdf["num_frames"] == 2 * 2 and cdf["num_videos"] == 2  # frame_num.test = 2
        assert 0.0 <= cdf["frame_auc"] <= 1.0
    assert again["Celeb-DF-v2"]["frame_auc"] == results["Celeb-DF-v2"]["frame_auc"]
    good = raw_ffpp / "original_sequences" / "youtube" / "c23" / "videos" / "000.mp4"
    bad = raw_ffpp / "manipulated_sequences" / "Deepfakes" / "c23" / "videos" / "006_007.mp4"
    with pytest.raises(errors.BadInput, match=r"1 of 2 input\(s\) could not be scored.*006_007"):
        predict.predict(cfg, workdir, [str(good), str(bad)], tmp_path / "p.json")
    written = json.loads((tmp_path / "p.json").read_text())
    assert written["inputs"][str(good)]["frames"] == FRAMES  # every frame: 6 < video_frames
    assert len(written["no_face"]) == FRAMES and all(n.startswith(str(bad))
                                                     for n in written["no_face"])
    assert "aligned and cropped as DeepfakeBench does" in written["processing"]


@pytest.mark.slow  # two CLI runs
def test_a_killed_run_resumes_skipping_finished_videos(tmp_path, tiny_clip_checkpoint, raw_cdf,
                                                       tree):
    """SIGKILL after the first finished video; the rerun does the rest (a half-written one
    again) and the tree equals the uninterrupted run's."""
    out = tmp_path / "dfb"
    args = [sys.executable, "-m", "fmsd_jax.main", *cli_args(out, tiny_clip_checkpoint, raw_cdf)]
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status = out / wf.PREPROCESS_STATUS_DIR
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if status.is_dir() and any(status.rglob("*.json")):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in status.rglob("*.json"))
    assert 1 <= len(finished) < 5, finished
    kept = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    # a half-written video: frames of a video with no status file yet
    half = out / "Celeb-DF-v2" / "YouTube-real" / "frames" / ".00000.partial"
    half.mkdir(parents=True, exist_ok=True)
    (half / "000.png").write_bytes(b"half")
    proc = run_cli(*cli_args(out, tiny_clip_checkpoint, raw_cdf))
    assert proc.returncode == 0, proc.stderr
    assert f"({len(finished)} finished earlier, {5 - len(finished)} to do)" in proc.stdout
    assert not half.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items() if p.exists())
    ref = tree[0]
    name = wf.DATASET_JSON_DIR + "/Celeb-DF-v2.json"
    assert json.loads((out / name).read_text()) == json.loads((ref / name).read_text())
    pngs = sorted(p.relative_to(out) for p in (out / "Celeb-DF-v2").rglob("*.png"))
    assert pngs == sorted(p.relative_to(ref) for p in (ref / "Celeb-DF-v2").rglob("*.png"))
    for p in pngs:
        assert (out / p).read_bytes() == (ref / p).read_bytes()
    # Other face settings make every finished video stale: all redone, none mixed in.
    import cv2

    small = preprocess.preprocess(pre_cfg(tiny_clip_checkpoint, out, raw_cdf,
                                          **{"data.face.size": "128"}), out)
    assert small["this_run"]["videos"] == 5 and small["done"] == 5
    assert {cv2.imread(str(out / p)).shape for p in pngs} == {(128, 128, 3)}


def test_bad_layouts_and_missing_split_files_are_one_line(tmp_path, tiny_clip_checkpoint,
                                                         raw_cdf):
    odd = tmp_path / "somewhere"
    (odd / "clips").mkdir(parents=True)
    line = one_line_error(run_cli(*cli_args(tmp_path / "out", tiny_clip_checkpoint, odd)))
    assert "matches neither raw layout (it holds ['clips'])" in line
    assert "original_sequences/youtube/<comp>/videos" in line and "Celeb-synthesis" in line
    assert [p.name for p in (tmp_path / "out").iterdir()] == [wf.LOCK_FILE]  # nothing else
    with pytest.raises(errors.BadInput, match="needs the raw dataset: set --config.preprocess"):
        preprocess.preprocess(pre_cfg(tiny_clip_checkpoint, tmp_path, ""), tmp_path / "o0")
    ff = tmp_path / "FaceForensics++"
    (ff / "original_sequences" / "youtube" / "c23" / "videos").mkdir(parents=True)
    (ff / "train.json").write_text("[]")
    with pytest.raises(errors.InputNotFound, match=r"split file\(s\) missing: .*val\.json or "
                       r".*splits/val\.json; .*test\.json"):
        preprocess.preprocess(pre_cfg(tiny_clip_checkpoint, tmp_path, ff), tmp_path / "o1")
    cdf = tmp_path / "Celeb-DF-v2"
    shutil.copytree(raw_cdf, cdf)
    (cdf / raw_videos.CDF2_TEST_LIST).unlink()
    with pytest.raises(errors.InputNotFound, match="List_of_testing_videos.txt"):
        preprocess.preprocess(pre_cfg(tiny_clip_checkpoint, tmp_path, cdf), tmp_path / "o2")
    with pytest.raises(errors.BadInput, match="lies inside config.preprocess.raw_root"):
        preprocess.preprocess(pre_cfg(tiny_clip_checkpoint, tmp_path, raw_cdf), raw_cdf / "o")
    assert not any((tmp_path / f"o{i}").exists() for i in range(3))


def test_sampling_is_deepfakebenchs_linspace():
    assert raw_videos.sample_indices(300, 32) == [int(i) for i in np.linspace(0, 299, 32)]
    assert raw_videos.sample_indices(6, 3) == [0, 2, 5]
    assert raw_videos.sample_indices(4, 32) == [0, 1, 2, 3]
    assert raw_videos.sample_indices(0, 32) == []
