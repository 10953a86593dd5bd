"""`--mode predict`: score image files, folders of frames and video files with a trained run.

An image is one frame. A folder is one video made of its images (sorted by their integer
names, as DeepfakeBench stores frames), unless `config.predict.per_image` is set: then each of
its images is scored on its own (a folder of separate face photos). A video file is sampled
evenly (`config.predict.video_frames` frames) and each frame's face cropped with
DeepfakeBench's 1.3 margin. Every frame gets P(fake), softmax(logits / T)[fake] with the
run's validation temperature (WORKDIR/decision.json, evaluators/decision.py); a video's score
is `config.eval.video_aggregation` of its frames' (default their mean, as DeepfakeBench's
video-level AUC averages them); the printed label is 'fake' when that score reaches the
threshold of `config.predict.operating_point`, chosen on validation at video level for a
video or a folder and at frame level for an image (or a number given as the threshold).

Every input is checked (exists, is an image OpenCV can decode, a video with frames) before the
model is loaded; an input that still cannot be scored makes the command exit non-zero, after
the others are written. An earlier predictions file is never replaced.

Inputs are keyed in the JSON by the path as given, whatever its bytes: a name that is not
valid UTF-8 is written as JSON's `\\udcXX` escape, which `json.load` turns back into the same
str and `os.fsencode` into the original bytes; the printed table shows it as `\\xXX`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import jax
import ml_collections as mlc
import numpy as np

from fmsd_jax import atomic, parallel
from fmsd_jax.data import records as rec
from fmsd_jax.data import transforms
from fmsd_jax.data import video as vid
from fmsd_jax.errors import AlreadyExists, BadInput
from fmsd_jax.evaluators import decision, metrics, result_files, scoring
from fmsd_jax.pathnames import shown
from fmsd_jax.run import rebuild, workdir_files

log = logging.getLogger("fmsd_jax")


def frames_to_score(inputs: list[str], data_cfg: mlc.ConfigDict, video_frames: int,
                    per_image: bool = False) -> list[dict]:
    """One record per frame; `video_id` names the input it came from (with `per_image`,
    each image of a folder is its own input). Every problem with the inputs is collected and
    reported at once, before any model is loaded."""
    image_ext = tuple(e.lower() for e in data_cfg.folder.image_extensions)
    video_ext = tuple(e.lower() for e in data_cfg.folder.video_extensions)
    out, problems = [], []

    def image(path: Path, video_id: str) -> None:
        # bytes: OpenCV segfaults on a str name that is not valid UTF-8 (see pathnames)
        if cv2.haveImageReader(os.fsencode(path)):
            out.append(rec.make_record(str(path), -1, "predict", "", video_id))
        else:
            problems.append(f"{path} (not an image OpenCV can decode)")

    for item in inputs:
        path = Path(item)
        ext = path.suffix.lower()
        if path.is_dir():
            frames = rec.sort_frames(str(p) for p in path.iterdir()
                                     if p.suffix.lower() in image_ext and p.is_file())
            if not frames:
                problems.append(f"{path} (a folder with no images {image_ext})")
            for f in frames:
                image(Path(f), f if per_image else str(path))
        elif not path.exists():
            problems.append(f"{path} (no such file or folder)")
        elif not path.is_file():  # a FIFO or a device would block or never end
            problems.append(f"{path} (not a regular file)")
        elif ext in video_ext:
            n = vid.frame_count(str(path))
            if n == 0:
                problems.append(f"{path} (no decodable video frames)")
            out += [rec.make_record(str(path), -1, "predict", "", str(path), int(i))
                    for i in rec.even_indices(n, video_frames)]
        elif ext in image_ext:
            image(path, str(path))
        else:
            problems.append(f"{path} (unknown file type {ext!r}: images {image_ext}, videos "
                            f"{video_ext}, or a folder of frames)")
    if problems:
        raise BadInput(f"cannot score {len(problems)} of {len(inputs)} input(s), nothing was "
                       f"scored: {'; '.join(problems)}")
    return out


def claim_output(workdir: Path, out_path: str | Path | None) -> Path:
    """Where the predictions go, claimed now (an empty file made with O_EXCL) so that two
    predict commands on one workdir never write the same file: --out, which must not exist
    yet, or the first free WORKDIR/predictions[-N].json; an earlier file is never replaced."""
    if out_path:
        try:
            return atomic.claim(out_path)
        except FileExistsError:
            raise AlreadyExists(f"--out {out_path} exists; choose another file or delete "
                                "it") from None
    return atomic.claim_free_name(workdir / workdir_files.PREDICTIONS_JSON)


def what_is_scored(data_cfg: mlc.ConfigDict, video_frames: int, per_image: bool,
                   kinds: set[str], aggregation: str = "mean") -> str:
    """What predict does to each kind of input given (`kinds`: 'image', 'folder', 'video'),
    in the words of its header: analysts must know whether a face was looked for."""
    size = int(data_cfg.image_size)
    face = (f"the largest face cropped (a square {data_cfg.video.face_margin:g} x its box, "
            "the centre square when no face is found)" if data_cfg.video.detect_faces
            else "its centre square")
    parts = []
    if kinds & {"image", "folder"}:
        parts.append("an image is taken whole as a face crop, as DeepfakeBench stores frames "
                     "(no face detection)")
    if "folder" in kinds:
        parts.append("a folder is " + ("a set of separate images" if per_image else
                                       f"one video of its images (score: their {aggregation})"))
    if "video" in kinds:
        parts.append(f"a video file gives {video_frames} frames taken evenly across it, each "
                     f"{face} (score: their {aggregation})")
    return "; ".join(parts) + f"; every frame resized to {size}x{size} px"


def decision_rule(cfg: mlc.ConfigDict, workdir: Path, frames: list[dict]
                  ) -> tuple[decision.Decision, dict[str, float]]:
    """The run's decision.json and the threshold of `config.predict.operating_point` at each
    level the inputs need (frame for a single image, video for a video file or a folder), or a
    one-line error, before the model loads."""
    decision.check_config(cfg)
    rule = decision.load_decision(workdir)
    levels = {level_of(r) for r in frames}
    return rule, {lv: rule.threshold(cfg.predict.operating_point, lv) for lv in levels}


def level_of(record: dict) -> str:
    """Which thresholds decide an input: a video file's frames and a folder's (one video)
    are aggregated, so video level; an image on its own is one frame."""
    return "video" if record["frame_index"] >= 0 or record["video_id"] != record["path"] \
        else "frame"


def predict(cfg: mlc.ConfigDict, workdir: str | Path, inputs: list[str],
            out_path: str | Path | None = None) -> dict:
    """Scores every input; prints one line per input and writes them as JSON."""
    workdir = Path(workdir)
    per_image = bool(cfg.predict.per_image)
    frames = frames_to_score(inputs, cfg.data, cfg.predict.video_frames, per_image)
    rule, thresholds = decision_rule(cfg, workdir, frames)
    mesh = parallel.make_mesh(cfg.mesh)
    batch_size = cfg.predict.batch_size
    parallel.check_batch_fits(mesh, batch_size, "config.predict.batch_size")
    keys = list(dict.fromkeys(r["video_id"] for r in frames))  # input order
    out = claim_output(workdir, out_path) if jax.process_index() == 0 else None
    try:
        result = _score(cfg, workdir, inputs, frames, keys, mesh, per_image, rule, thresholds)
    except BaseException:
        if out is not None:
            atomic.release_unfilled(out)
        raise
    if out is not None:
        atomic.write_json(out, result)
        log.info("wrote %s", os.fspath(out))
    failed = [k for k in keys if k not in result["inputs"]]
    if failed:
        raise BadInput(f"{len(failed)} of {len(keys)} input(s) could not be scored (their frames "
                       f"did not decode): {', '.join(failed)}; the others are in {out}")
    return result


def _score(cfg: mlc.ConfigDict, workdir: Path, inputs: list[str], frames: list[dict],
           keys: list[str], mesh, per_image: bool, rule: decision.Decision,
           thresholds: dict[str, float]) -> dict:
    """Scores the frames, prints the table (one row per input of `keys`, in input order) and
    returns what predictions.json holds."""
    batch_size = cfg.predict.batch_size
    run = rebuild.open_run(cfg, workdir, mesh, estimate=False)
    trainable, step, which = rebuild.restore_for_eval(cfg, workdir, run, "scoring inputs with")
    kinds = {"video" if r["frame_index"] >= 0 else "image" for r in frames}
    if any(Path(i).is_dir() for i in inputs):
        kinds.add("folder")
    processing = what_is_scored(cfg.data, cfg.predict.video_frames, per_image, kinds,
                                rule.aggregation)
    log.info("scoring %d frame(s) of %d input(s)", len(frames), len(inputs))
    predict_fn = scoring.make_predict_fn(run.graphdef, mesh)
    temperature = scoring.temperature_arg(rule.temperature)
    reader = transforms.ImageReader.from_config(cfg.data)

    probs, margins, readable = [], [], []
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
        batch = parallel.global_batch(mesh, {"image": np.stack(images)}, ("image",))
        scored = predict_fn(trainable, run.frozen, batch["image"], temperature)
        probs.append(np.asarray(scored["prob"])[:len(chunk)])
        margins.append(np.asarray(scored["logit"])[:len(chunk)])
    probs, margins = np.concatenate(probs), np.concatenate(margins)

    per_input: dict[str, list[int]] = {}
    unreadable = []
    for i, (record, ok) in enumerate(zip(frames, readable, strict=True)):
        if ok:
            per_input.setdefault(record["video_id"], []).append(i)
        else:
            unreadable.append(f"{record['path']}#{record['frame_index']}"
                              if record["frame_index"] >= 0 else record["path"])
    point = cfg.predict.operating_point
    model = {"workdir": os.fspath(workdir.absolute()), "checkpoint": which,
             "step": step, "regime": cfg.method.regime,
             "train_dataset": list(cfg.data.train_dataset)}
    rules = {lv: decision.describe(rule, point, lv) for lv in thresholds}
    result = {"operating_point": str(point), "thresholds": thresholds, "rule": rules,
              "temperature": rule.temperature,
              "prob": f"P(fake): softmax(logits / T)[fake] with T = {rule.temperature:.4g} "
                      f"fitted on validation ({rule.note or 'decision.json'}); an input's is "
                      f"the {rule.aggregation} of its frames'",
              "model": model, "processing": processing, "inputs": {}, "unreadable": unreadable}
    first_of = {r["video_id"]: r for r in reversed(frames)}
    for key, rows in per_input.items():
        level = level_of(first_of[key])
        p = probs[rows].astype(np.float64)
        prob = float(metrics.aggregate_by_video(p, np.zeros(len(rows)), [key] * len(rows),
                                                how=rule.aggregation, topk=rule.topk)[0][0])
        result["inputs"][key] = {"prob_fake": prob, "level": level,
                                 "label": "fake" if prob >= thresholds[level] else "real",
                                 "frames": len(rows), "frame_probs": p.tolist(),
                                 "frame_logits": margins[rows].astype(np.float64).tolist()}
    print(f"# model: {model['workdir']}, {which} checkpoint (step {step}), "
          f"{result_files.method_name(cfg.method.regime)} trained on "
          f"{', '.join(model['train_dataset'])}")
    print(f"# input: {processing}")
    print(f"# P(fake): calibrated with T = {rule.temperature:.4g}"
          + (f" ({rule.note})" if rule.note else ""))
    for level, text in rules.items():
        print(f"# label ({'images' if level == 'frame' else 'videos and folders'}): {text}")
    print(f"P(fake)  label (operating point {point})  input")
    for key in keys:
        if key in result["inputs"]:
            r = result["inputs"][key]
            n = r["frames"]
            print(f"{r['prob_fake']:.4f}   {r['label']:<4}  {shown(key)}  "
                  f"({n} frame{'s' * (n > 1)})")
        else:
            print(f"  n/a    -     {shown(key)}  (unreadable)")
    return result
