"""Throughput of `--mode preprocess` per core, by stage, beside DeepfakeBench's way of reading.

  PYTHONPATH=. python bench/preprocess.py [--frames 300] [--sizes 854x480,1280x720]
      [--upsample 1,0]

Writes a synthetic raw video per size (matplotlib's grace_hopper photograph panning across a
frame of that size, mp4v, `--frames` long: FF++'s videos are ~300-700 frames at 480p-1080p)
into a temporary folder and preprocesses it as the mode does (32 frames evenly, HOG, 68
landmarks, 256-px crops, PNG + .npy) in one process, then times each stage alone:
decoding the whole video (our read: grab every frame, convert the 32 kept; DeepfakeBench's:
read() every frame), detection with one upsample, the predictor, the alignment and the writes.
Prints one table; "stored frames/s/core" is the figure README quotes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import cv2

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from conftest import face_photos, write_face_video  # noqa: E402

from fmsd_jax.data import faces, raw_videos  # noqa: E402
from fmsd_jax.data import video as vid  # noqa: E402


def _time(fn, repeat: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def bench(size: tuple[int, int], frames: int, folder: str, upsample: int) -> dict:
    still = face_photos()["grace_hopper"]
    cropper = faces.FaceCropper(upsample=upsample)
    b = cropper.crop(still).box
    path = os.path.join(folder, f"{size[0]}x{size[1]}.mp4")
    write_face_video(path, still, ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2), n=frames, size=size,
                     zoom=size[1] / 600 * 0.8, pan=(0.3, 0.1), turn=0.05)
    video = raw_videos.RawVideo(path, "bench", "v", "FF-real", ("train",))
    cropper.crop(still)  # models loaded before timing
    total = _time(lambda: raw_videos.preprocess_video(
        video, folder, os.path.join(folder, "status.json"), 32, cropper))
    wanted = raw_videos.sample_indices(vid.frame_count(path), 32)
    kept = dict(vid.read_frames(path, wanted))

    def dfb_read():
        cap = cv2.VideoCapture(path)
        while cap.read()[0]:
            pass
        cap.release()

    ours_read = _time(lambda: dict(vid.read_frames(path, wanted)))
    their_read = _time(dfb_read)
    imgs = list(kept.values())
    boxes = []
    detect = _time(lambda: boxes.extend(cropper.detect(x)[0] for x in imgs)) / len(imgs)
    marks = []
    predict = _time(lambda: marks.extend(cropper.landmarks(x, bx) for x, bx in
                                         zip(imgs, boxes, strict=True))) / len(imgs)
    align = _time(lambda: [faces.align(x, cropper.key_points(m), 256, 1.3)
                           for x, m in zip(imgs, marks, strict=True)]) / len(imgs)
    crop = faces.align(imgs[0], cropper.key_points(marks[0]), 256, 1.3)[0]
    write = _time(lambda: cv2.imencode(".png", crop), repeat=20)
    return {"size": f"{size[0]}x{size[1]}", "upsample": upsample, "frames": frames,
            "total_s": total,
            "stored_per_s": len(wanted) / total, "read_ours_s": ours_read,
            "read_dfb_s": their_read, "detect_ms": detect * 1e3, "landmarks_ms": predict * 1e3,
            "align_ms": align * 1e3, "png_ms": write * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--sizes", default="854x480,1280x720")
    ap.add_argument("--upsample", default="1,0", help="data.face.upsample values (DFB: 1)")
    args = ap.parse_args()
    cv2.setNumThreads(1)  # one core, as each worker process runs
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for s in args.sizes.split(","):
            w, h = (int(v) for v in s.split("x"))
            for up in args.upsample.split(","):
                rows.append(bench((w, h), args.frames, folder, int(up)))
    print(f"# one process, cv2 threads 1, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; 32 frames stored of each {args.frames}-frame video")
    print("| video | upsample | seconds/video | stored frames/s/core | decode all (ours / DFB "
          "read) s | detect ms | landmarks ms | align ms | PNG ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['upsample']} | {r['total_s']:.2f} | {r['stored_per_s']:.1f} | "
              f"{r['read_ours_s']:.2f} / {r['read_dfb_s']:.2f} | {r['detect_ms']:.0f} | "
              f"{r['landmarks_ms']:.1f} | {r['align_ms']:.1f} | {r['png_ms']:.1f} |")


if __name__ == "__main__":
    main()
