"""`--mode preprocess`: a raw FaceForensics++ or Celeb-DF-v2 download → a DeepfakeBench tree.

  python -m fmsd_jax.main --config configs/clip_b16.py --mode preprocess --workdir OUT \\
      --config.preprocess.raw_root=/data/raw/FaceForensics++

WORKDIR (OUT) becomes a DeepfakeBench dataset root: frames and landmarks under the raw tree's
own relative paths (fmsd_jax/data/raw_videos.py), `dataset_json/<dataset>.json`, and in
`<dataset>/` the list of videos with no face and a summary. Both datasets may share one WORKDIR
(then one dataset_root serves training and testing). Train on it with configs/clip_b16.py unchanged:
`--config.data.dataset_root=OUT --config.data.dataset_json_folder=OUT/dataset_json`.

Videos are processed in parallel over `config.preprocess.workers` processes (spawned: the
parent may have started JAX, which a fork would copy half-initialised). Each finished video
leaves a status file under WORKDIR/.preprocess/, written last, so a killed run resumes by
skipping the finished videos and redoing a half-written one (and any video finished with
other frame or face settings, so one tree never mixes two crops). The run ends with a summary and
exits 2 when any video was skipped (no face, unreadable, in no split file), after writing the
dataset JSON of the others.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import time
from pathlib import Path

import cv2
import ml_collections as mlc

from fmsd_jax import atomic
from fmsd_jax.data import faces, raw_videos
from fmsd_jax.errors import BadInput
from fmsd_jax.run import workdir_files as wf

log = logging.getLogger("fmsd_jax")

_CROPPER: faces.FaceCropper | None = None  # one per worker process


def _init_worker(cropper: faces.FaceCropper) -> None:
    global _CROPPER
    cv2.setNumThreads(1)  # one process per core already
    _CROPPER = cropper


def _work(video: raw_videos.RawVideo, out: str, status: str, num_frames: int) -> dict:
    try:
        return raw_videos.preprocess_video(video, out, status, num_frames, _CROPPER,
                                           wf.FRAMES_DIR, wf.LANDMARKS_DIR)
    except cv2.error as e:  # a container OpenCV chokes on: the video's problem, not ours
        result = {"video": video.path, "settings": raw_videos.settings(_CROPPER, num_frames),
                  "status": "unreadable", "reason": str(e).strip(),
                  "frames": [], "no_face_frames": [], "decoded": 0, "seconds": 0.0}
        atomic.write_json(status, result)
        return result


def status_path(workdir: Path, video: raw_videos.RawVideo) -> str:
    return os.fspath(workdir / wf.PREPROCESS_STATUS_DIR / f"{video.key}.json")


def resolve_workers(n: int) -> int:
    """-1: one process per core this process may use."""
    if n > 0:
        return n
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def preprocess(cfg: mlc.ConfigDict, workdir: str | Path) -> dict:
    """Preprocesses every video of `config.preprocess.raw_root` into WORKDIR; returns the
    summary it writes (WORKDIR/<dataset>/preprocess_summary.json)."""
    p = cfg.preprocess
    workdir = Path(workdir)
    if not p.raw_root:
        raise BadInput("--mode preprocess needs the raw dataset: set "
                       "--config.preprocess.raw_root=/path/to/FaceForensics++ (or Celeb-DF-v2)")
    if int(p.num_frames) < 0:
        raise BadInput(f"config.preprocess.num_frames={p.num_frames} must be >= 0 (0: every "
                       "frame); DeepfakeBench takes 32")
    root = os.path.abspath(p.raw_root)
    if workdir.absolute() == Path(root) or Path(root) in workdir.absolute().parents:
        raise BadInput(f"--workdir {workdir} lies inside config.preprocess.raw_root; give an "
                       "output folder outside the raw dataset (nothing is written into it)")
    dataset = raw_videos.detect_layout(root)
    if p.dataset and p.dataset != dataset:
        raise BadInput(f"config.preprocess.dataset={p.dataset!r} but {root} has {dataset}'s "
                       "layout; set --config.preprocess.dataset='' (told by the layout)")
    videos, left_out = raw_videos.list_videos(root, dataset, cfg.data.compression)
    cropper = faces.FaceCropper.from_config(cfg.data)  # a missing model is named before work
    want = raw_videos.settings(cropper, int(p.num_frames))
    statuses: dict[str, dict] = {}
    todo = []
    for v in videos:
        s = raw_videos.read_status(status_path(workdir, v), v, os.fspath(workdir), want,
                                   wf.FRAMES_DIR)
        if s is None:
            todo.append(v)
        else:
            statuses[v.key] = s
    workers = min(resolve_workers(int(p.workers)), max(len(todo), 1))
    log.info("%s at %s: %d videos (%d finished earlier, %d to do) with %d process(es), %d "
             "frames each", dataset, root, len(videos), len(statuses), len(todo), workers,
             p.num_frames)
    atomic.note_written(workdir / dataset, os.path.isdir(workdir / dataset))
    t0 = time.perf_counter()
    for result in _run(todo, workdir, int(p.num_frames), cropper, workers, t0):
        statuses[result[0].key] = result[1]
    seconds = time.perf_counter() - t0
    return _finish(workdir, dataset, root, videos, statuses, left_out, todo, seconds, workers)


def _run(todo, workdir: Path, num_frames: int, cropper, workers: int, t0: float):
    """(video, status) as each finishes, with a progress line (videos, frames/s, ETA)."""
    out = os.fspath(workdir)
    done_frames, last = 0, 0.0
    if workers <= 1:
        _init_worker(cropper)
        results = ((v, _work(v, out, status_path(workdir, v), num_frames)) for v in todo)
    else:
        pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_init_worker, initargs=(cropper,))
        futures = {pool.submit(_work, v, out, status_path(workdir, v), num_frames): v
                   for v in todo}
        results = ((futures[f], f.result()) for f in cf.as_completed(futures))
    try:
        for i, (video, result) in enumerate(results, 1):
            done_frames += len(result.get("frames", [])) + len(result.get("no_face_frames", []))
            now = time.perf_counter() - t0
            if now - last >= 10 or i == len(todo):
                last = now
                eta = now / i * (len(todo) - i)
                log.info("preprocess: %d/%d videos, %.1f frames/s, ETA %s", i, len(todo),
                         done_frames / max(now, 1e-9), _clock(eta))
            yield video, result
    finally:
        if workers > 1:
            pool.shutdown(cancel_futures=True)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _finish(workdir: Path, dataset: str, root: str, videos, statuses: dict, left_out: list,
            todo, seconds: float, workers: int) -> dict:
    json_path = workdir / wf.DATASET_JSON_DIR / f"{dataset}.json"
    atomic.write_json(json_path, raw_videos.dataset_json(dataset, videos, statuses,
                                                         wf.FRAMES_DIR))
    by = {k: [v for v in videos if statuses.get(v.key, {}).get("status") == k]
          for k in ("done", "no_face", "unreadable")}
    no_face_path = workdir / dataset / wf.NO_FACE_TXT
    atomic.write_text(no_face_path, "".join(
        f"{v.path}\t{statuses[v.key].get('decoded', 0)} frames decoded, none with a face\n"
        for v in by["no_face"]))
    fresh = [statuses[v.key] for v in todo if v.key in statuses]
    frames = sum(len(s.get("frames", [])) + len(s.get("no_face_frames", [])) for s in fresh)
    summary = {
        "dataset": dataset, "raw_root": root, "videos": len(videos),
        "done": len(by["done"]), "no_face": len(by["no_face"]),
        "unreadable": {v.path: statuses[v.key].get("reason", "") for v in by["unreadable"]},
        "left_out": left_out, "frames_stored": sum(len(statuses[v.key]["frames"])
                                                   for v in by["done"]),
        "this_run": {"videos": len(fresh), "frames_read": frames, "seconds": round(seconds, 2),
                     "processes": workers,
                     "frames_per_s": round(frames / seconds, 2) if seconds > 0 else 0.0,
                     "frames_per_s_per_process": round(frames / seconds / workers, 2)
                     if seconds > 0 else 0.0},
        "dataset_json": os.fspath(json_path), "no_face_list": os.fspath(no_face_path)}
    atomic.write_json(workdir / dataset / wf.PREPROCESS_SUMMARY_JSON, summary, sort_keys=False)
    log.info("preprocess: %d of %d videos done (%d frames stored), %d with no face (listed in "
             "%s), %d unreadable, %d in no split file; %s written", summary["done"],
             len(videos), summary["frames_stored"], summary["no_face"], no_face_path,
             len(summary["unreadable"]), len(left_out), json_path)
    skipped = summary["no_face"] + len(summary["unreadable"]) + len(left_out)
    if skipped:
        parts = ([f"{summary['no_face']} with no face (listed in {no_face_path})"]
                 if summary["no_face"] else []) + \
            [f"{len(summary['unreadable'])} unreadable (" + ", ".join(
                f"{k} ({v})" if v else k for k, v in summary["unreadable"].items()) + ")"] \
            * bool(summary["unreadable"]) + \
            [f"{len(left_out)} left out ({', '.join(left_out)})"] * bool(left_out)
        raise BadInput(f"preprocess skipped {skipped} of {len(videos) + len(left_out)} "
                       f"videos: {'; '.join(parts)}; {json_path} holds the "
                       f"{summary['done']} others")
    return summary
