"""`--mode predict`: score image files, folders of frames and video files with a trained run.

An image is one frame. A folder is one video made of its images (sorted by their integer
names, as DeepfakeBench stores frames), unless `config.predict.per_image` is set: then each of
its images is scored on its own (a folder of separate face photos). A video file is sampled
evenly (`config.predict.video_frames` frames) and each frame's face cut as DeepfakeBench
cuts its training frames (fmsd_jax/data/faces.py: dlib detection, five-point alignment, scale
1.3); a frame without a face is left out and listed (`config.data.face.if_none='skip'`) or
scored as its centre square and counted (`'centre'`). Every frame gets P(fake),
softmax(logits / T)[fake] with the run's validation temperature (WORKDIR/decision.json,
evaluators/decision.py); a video's score is `config.eval.video_aggregation` of its frames'
(default their mean, as DeepfakeBench's video-level AUC averages them); the printed label is
'fake' when that score reaches the threshold of `config.predict.operating_point`, chosen on
validation at video level for a video or a folder and at frame level for an image (or a
number given as the threshold).

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
from fmsd_jax.evaluators import decision, explain, metrics, result_files, saliency, scoring
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
    f = data_cfg.face
    face = (f"the largest face aligned and cropped as DeepfakeBench does (dlib {f.detector}, "
            f"five points, scale {f.scale:g}; a frame with no face "
            + ("left out)" if f.if_none == "skip" else "taken as its centre square, counted)")
            if f.enabled else "its centre square (no face detection)")
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


def frame_name(record: dict) -> str:
    """How a frame is named in predictions.json and its overlay: a video file's as
    'path#index', an image's by its path."""
    return (f"{record['path']}#{record['frame_index']}" if record["frame_index"] >= 0
            else record["path"])


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
        result = _score(cfg, workdir, inputs, frames, keys, mesh, per_image, rule, thresholds,
                        out)
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
                       f"did not decode, or held no face: {out} lists them under 'unreadable' "
                       f"and 'no_face'): {', '.join(failed)}; the others are in {out}")
    return result


def _score(cfg: mlc.ConfigDict, workdir: Path, inputs: list[str], frames: list[dict],
           keys: list[str], mesh, per_image: bool, rule: decision.Decision,
           thresholds: dict[str, float], out: Path | None = None) -> dict:
    """Scores the frames, prints the table (one row per input of `keys`, in input order) and
    returns what predictions.json holds. With `config.predict.explain`, each frame also gets
    its per-subspace Δ fake logit and a patch map, written as a PNG overlay into the folder
    beside `out` (`saliency.overlay_dir`; process 0 writes, `out` None elsewhere)."""
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
    explainer = (explain.Explainer.for_run(run, trainable, predict_fn,
                                           cfg.predict.explain_steps)
                 if cfg.predict.explain else None)
    overlays = saliency.overlay_dir(out) if explainer and out is not None else None
    per_frame: list[dict] = []  # explain: one dict per frame, in order

    probs, margins, readable, hows = [], [], [], []
    for start in range(0, len(frames), batch_size):
        chunk = frames[start:start + batch_size]
        images = []
        for record in chunk:
            image, how = reader.frame(record)
            readable.append(image is not None)
            hows.append(how)
            if image is None:  # scored as a blank frame, then dropped below
                image = np.zeros((cfg.data.image_size,) * 2 + (3,), np.uint8)
            images.append(image)  # uint8: the detector normalises on the device
        images += [np.zeros_like(images[0])] * (batch_size - len(images))  # static shapes
        batch = parallel.global_batch(mesh, {"image": np.stack(images)}, ("image",))
        scored = predict_fn(trainable, run.frozen, batch["image"], temperature)
        probs.append(np.asarray(scored["prob"])[:len(chunk)])
        margins.append(np.asarray(scored["logit"])[:len(chunk)])
        if explainer is not None:
            per_frame += _explain_chunk(explainer, batch["image"], chunk, images,
                                        readable[start:], overlays)
    probs, margins = np.concatenate(probs), np.concatenate(margins)

    per_input: dict[str, list[int]] = {}
    unreadable, no_face, centre = [], [], {}
    for i, (record, ok, how) in enumerate(zip(frames, readable, hows, strict=True)):
        name = frame_name(record)
        if ok:
            per_input.setdefault(record["video_id"], []).append(i)
            if how == "centre" and cfg.data.face.enabled:
                centre[record["video_id"]] = centre.get(record["video_id"], 0) + 1
        else:
            (no_face if how == "no_face" else unreadable).append(name)
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
              "model": model, "processing": processing, "inputs": {}, "unreadable": unreadable,
              "no_face": no_face}
    first_of = {r["video_id"]: r for r in reversed(frames)}
    for key, rows in per_input.items():
        level = level_of(first_of[key])
        p = probs[rows].astype(np.float64)
        prob = metrics.video_score(p, how=rule.aggregation, topk=rule.topk)
        result["inputs"][key] = {"prob_fake": prob, "level": level,
                                 "label": "fake" if prob >= thresholds[level] else "real",
                                 "frames": len(rows), "frame_probs": p.tolist(),
                                 "frame_logits": margins[rows].astype(np.float64).tolist()}
        if key in centre:
            result["inputs"][key]["frames_without_face"] = centre[key]
        if explainer is not None:
            result["inputs"][key]["explain"] = _input_explanation(
                [per_frame[i] for i in rows], explainer)
    print(f"# model: {model['workdir']}, {which} checkpoint (step {step}), "
          f"{result_files.method_name(cfg.method.regime)} trained on "
          f"{', '.join(model['train_dataset'])}")
    print(f"# input: {processing}")
    print(f"# P(fake): calibrated with T = {rule.temperature:.4g}"
          + (f" ({rule.note})" if rule.note else ""))
    for level, text in rules.items():
        print(f"# label ({'images' if level == 'frame' else 'videos and folders'}): {text}")
    if explainer is not None:
        result["explain"] = {
            "subspaces": "Δ fake logit (l1 - l0, uncalibrated) when each artifact subspace's "
                         "training is undone (trained minus undone: positive pushes towards "
                         "'fake')" if explainer.variants is not None else explainer.subspaces_note,
            "heatmap": f"integrated gradients of the fake logit per patch "
                       f"({explainer.steps} steps, evaluators/saliency.py), PNG overlays"
                       + (f" in {os.fspath(overlays)}" if overlays else "")}
        print(f"# explain: {result['explain']['heatmap']}; per-subspace numbers: "
              + ("in the JSON" if explainer.variants is not None else explainer.subspaces_note))
    print(f"P(fake)  label (operating point {point})  input")
    for key in keys:
        if key in result["inputs"]:
            r = result["inputs"][key]
            n = r["frames"]
            print(f"{r['prob_fake']:.4f}   {r['label']:<4}  {shown(key)}  "
                  f"({n} frame{'s' * (n > 1)})")
        else:
            print(f"  n/a    -     {shown(key)}  (unreadable, or no face in any frame)")
    return result


def _explain_chunk(explainer: explain.Explainer, device_images, chunk: list[dict],
                   images: list[np.ndarray], readable: list[bool], overlays: Path | None
                   ) -> list[dict]:
    """The explanation of each frame of one batch (padding dropped); overlays written for the
    frames that decoded."""
    got = explainer(device_images)
    rows = []
    names = [frame_name(r) for r in chunk]
    ok = [i for i in range(len(chunk)) if readable[i]]
    paths = (saliency.write_overlays(np.stack([images[i] for i in ok]), got["map"][ok],
                                     overlays, [names[i] for i in ok])
             if overlays is not None and ok else [])
    where = dict(zip(ok, paths, strict=True)) if paths else {}
    for i in range(len(chunk)):
        rows.append({
            "subspaces": None if got["subspaces"] is None else got["subspaces"][i].tolist(),
            "completeness_gap": float(got["completeness_gap"][i]),
            "heatmap": os.fspath(where[i]) if i in where else None})
    return rows


def _input_explanation(frames: list[dict], explainer: explain.Explainer) -> dict:
    """An input's explanation: the mean per-subspace Δ over its frames, and each frame's."""
    out: dict = {"heatmaps": [f["heatmap"] for f in frames],
                 "completeness_gap": [f["completeness_gap"] for f in frames]}
    if explainer.variants is None:
        out["subspaces"] = None
    else:
        per = np.asarray([f["subspaces"] for f in frames], np.float64)
        out["subspaces"] = [{"subspace": k, "delta_logit": float(per[:, k].mean())}
                            for k in range(per.shape[1])]
        out["frame_subspaces"] = per.tolist()
    return out
