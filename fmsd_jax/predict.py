"""`--mode predict`: score image files, folders of frames and video files with a trained run.

An image is one frame. A folder is one video made of its images (sorted by their integer
names, as DeepfakeBench stores frames). A video file is sampled evenly
(`config.predict.video_frames` frames) and each frame's face cropped with DeepfakeBench's 1.3
margin. Every frame gets P(fake); a video's score is the mean over its frames, as DeepfakeBench's
video-level AUC averages them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import ml_collections as mlc
import numpy as np

from fmsd_jax import build, checkpointing, evaluate, sharding
from fmsd_jax.data import records as rec
from fmsd_jax.data import transforms
from fmsd_jax.data import video as vid

log = logging.getLogger("fmsd_jax")


def frames_to_score(inputs: list[str], data_cfg: mlc.ConfigDict,
                    video_frames: int) -> list[dict]:
    """One record per frame; `video_id` names the input it came from."""
    image_ext = tuple(e.lower() for e in data_cfg.folder.image_extensions)
    video_ext = tuple(e.lower() for e in data_cfg.folder.video_extensions)
    out = []
    for item in inputs:
        path = Path(item)
        ext = path.suffix.lower()
        if path.is_dir():
            frames = rec.sort_frames(str(p) for p in path.iterdir()
                                     if p.suffix.lower() in image_ext)
            if not frames:
                raise ValueError(f"{path}: folder holds no images with extensions {image_ext}")
            out += [rec.make_record(f, -1, "predict", "", str(path)) for f in frames]
        elif not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder to score")
        elif ext in video_ext:
            n = vid.frame_count(str(path))
            if n == 0:
                raise ValueError(f"{path}: no decodable frames (is it a video file?)")
            out += [rec.make_record(str(path), -1, "predict", "", str(path), int(i))
                    for i in rec.even_indices(n, video_frames)]
        elif ext in image_ext:
            out.append(rec.make_record(str(path), -1, "predict", "", str(path)))
        else:
            raise ValueError(f"{path}: unknown file type {ext!r}; images {image_ext}, "
                             f"videos {video_ext}, or a folder of frames")
    return out


def predict(cfg: mlc.ConfigDict, workdir: str | Path, inputs: list[str],
            out_path: str | Path | None = None) -> dict:
    """Scores every input; prints one line per input and writes them as JSON."""
    workdir = Path(workdir)
    frames = frames_to_score(inputs, cfg.data, cfg.predict.video_frames)
    mesh = sharding.make_mesh(cfg.mesh)
    batch_size = cfg.predict.batch_size
    sharding.check_batch_fits(mesh, batch_size, "config.predict.batch_size")
    run = build.prepare(cfg, workdir, mesh, estimate=False)
    trainable = build.restore_trainable(cfg, workdir, run)
    predict_fn = evaluate.make_predict_fn(run.graphdef, mesh)
    reader = transforms.ImageReader.from_config(cfg.data)

    probs, readable = [], []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start:start + batch_size]
        images = []
        for record in chunk:
            image = reader(record)
            readable.append(image is not None)
            if image is None:  # scored as a blank frame, then dropped below
                image = np.zeros((cfg.data.image_size,) * 2 + (3,), np.uint8)
            images.append(image)  # uint8: the detector normalises on the device
        images += [np.zeros_like(images[0])] * (batch_size - len(images))  # static shapes
        batch = sharding.global_batch(mesh, {"image": np.stack(images)}, ("image",))
        probs.append(np.asarray(predict_fn(trainable, run.frozen, batch["image"]))[:len(chunk)])
    probs = np.concatenate(probs)

    per_input: dict[str, list[float]] = {}
    unreadable = []
    for record, p, ok in zip(frames, probs, readable, strict=True):
        if ok:
            per_input.setdefault(record["video_id"], []).append(float(p))
        else:
            unreadable.append(f"{record['path']}#{record['frame_index']}"
                              if record["frame_index"] >= 0 else record["path"])
    result = {"inputs": {k: {"prob_fake": float(np.mean(v)), "frames": len(v),
                             "frame_probs": v} for k, v in per_input.items()},
              "unreadable": unreadable}
    for item in inputs:
        key = str(Path(item))
        if key in result["inputs"]:
            r = result["inputs"][key]
            print(f"{r['prob_fake']:.4f}  {key}  ({r['frames']} frame{'s' * (r['frames'] > 1)})")
        else:
            print(f"  n/a   {key}  (unreadable)")
    out = Path(out_path or workdir / "predictions.json")
    if jax.process_index() == 0:
        checkpointing.write_json_atomic(out, result)
        log.info("wrote %s", os.fspath(out))
    return result
