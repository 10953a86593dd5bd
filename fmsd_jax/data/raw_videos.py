"""Raw video datasets in their official layouts, and one video turned into DeepfakeBench frames.

Two layouts are read, as their authors ship them and as DeepfakeBench's
`preprocessing/preprocess.py` and `rearrange.py` walk them:

FaceForensics++ (ROOT/):
  original_sequences/youtube/<comp>/videos/000.mp4
  manipulated_sequences/<method>/<comp>/videos/000_003.mp4   (Deepfakes, Face2Face, FaceSwap,
                                                              NeuralTextures)
  train.json, val.json, test.json (or splits/<name>.json)     the official pair lists
Celeb-DF-v2 (ROOT/):
  Celeb-real/, YouTube-real/, Celeb-synthesis/ holding *.mp4 (or a videos/ folder of them)
  List_of_testing_videos.txt                                  "<1 real | 0 fake> <dir>/<name>.mp4"

Split rules: FaceForensics++ puts a real video and its fakes in the split of its pair (the
official lists, as rearrange.py); Celeb-DF-v2's test list is the test split and the val split
(DeepfakeBench has no other validation set for it) and every other video is train
(rearrange.py also puts the test videos in train: a test set seen in training, not copied).

A video becomes N frames sampled by DeepfakeBench's rule (`np.linspace(0, count - 1, N)`, the
first and last frame included; its default N is 32), each cut by fmsd_jax/data/faces.py and
stored as OUT/<dataset path>/frames/<video>/<frame index:03d>.png with the crop's 68 landmarks
in landmarks/<video>/<index:03d>.npy, as DeepfakeBench names them. A frame without a face is
not stored (DeepfakeBench stores none either); a video none of whose frames holds a face is
'no_face'; one that opens but decodes no frame is 'unreadable'.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import cv2
import numpy as np

from fmsd_jax import atomic
from fmsd_jax.data import faces
from fmsd_jax.data import video as vid
from fmsd_jax.errors import BadInput, InputNotFound

FFPP = 'FaceForensics++'
CDF2 = 'Celeb-DF-v2'
DATASETS = (FFPP, CDF2)
FFPP_METHODS = {'Deepfakes': 'FF-DF', 'Face2Face': 'FF-F2F', 'FaceSwap': 'FF-FS',
                'NeuralTextures': 'FF-NT'}
FFPP_SPLITS = ('train', 'val', 'test')
CDF2_FOLDERS = {'Celeb-real': 'CelebDFv2_real', 'YouTube-real': 'CelebDFv2_real',
                'Celeb-synthesis': 'CelebDFv2_fake'}
CDF2_TEST_LIST = 'List_of_testing_videos.txt'
VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.webm')
EXPECTED = (f"{FFPP}'s (ROOT/original_sequences/youtube/<comp>/videos/*.mp4 and "
            "ROOT/manipulated_sequences/<method>/<comp>/videos/*.mp4) or "
            f"{CDF2}'s (ROOT/Celeb-real, ROOT/YouTube-real and ROOT/Celeb-synthesis holding "
            f"*.mp4, with ROOT/{CDF2_TEST_LIST})")


@dataclasses.dataclass(frozen=True)
class RawVideo:
    """One video to preprocess: `where` is its folder's path relative to the output root
    (DeepfakeBench's, e.g. 'FaceForensics++/original_sequences/youtube/c23'), under which
    frames/<name>/ and landmarks/<name>/ are written."""

    path: str
    where: str
    name: str
    label_group: str
    splits: tuple[str, ...]
    compression: str = ''

    @property
    def key(self) -> str:
        return f'{self.where}/{self.name}'


def detect_layout(root: str) -> str:
    """Which of the two layouts ROOT is, or one line naming both."""
    if not os.path.isdir(root):
        raise InputNotFound(f'config.preprocess.raw_root={root!r} is not a folder; give the '
                            f'folder of a raw dataset, {EXPECTED}')
    if os.path.isdir(os.path.join(root, 'original_sequences')) or \
            os.path.isdir(os.path.join(root, 'manipulated_sequences')):
        return FFPP
    if any(os.path.isdir(os.path.join(root, f)) for f in CDF2_FOLDERS):
        return CDF2
    have = sorted(os.listdir(root))[:8]
    raise BadInput(f'{root} matches neither raw layout (it holds {have or "nothing"}); '
                   f'expected {EXPECTED}')


def list_videos(root: str, dataset: str, compression: str) -> tuple[list[RawVideo], list[str]]:
    """Every video of the raw dataset at ROOT with its label group and splits, and the videos
    that are left out, each with why (a FaceForensics++ video in no split file)."""
    if dataset == FFPP:
        return _ffpp(root, compression)
    if dataset == CDF2:
        return _cdf2(root)
    raise BadInput(f'config.preprocess.dataset={dataset!r} is not one of {DATASETS} '
                   '(or empty: told by the layout)')


def _video_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(VIDEO_EXTENSIONS)
                  and os.path.isfile(os.path.join(folder, f)))


def _ffpp_split_files(root: str) -> dict[str, str]:
    found, missing = {}, []
    for split in FFPP_SPLITS:
        options = [os.path.join(root, f'{split}.json'), os.path.join(root, 'splits',
                                                                     f'{split}.json')]
        path = next((p for p in options if os.path.isfile(p)), None)
        if path is None:
            missing.append(' or '.join(options))
        else:
            found[split] = path
    if missing:
        raise InputNotFound(f'{FFPP} split file(s) missing: {"; ".join(missing)}; copy '
                            "FaceForensics++'s official dataset/splits/{train,val,test}.json "
                            'there')
    return found


def _ffpp(root: str, compression: str) -> tuple[list[RawVideo], list[str]]:
    split_of: dict[str, str] = {}
    for split, path in _ffpp_split_files(root).items():
        pairs = atomic.read_json(path)
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2
                                                  for p in pairs):
            raise BadInput(f'{path} is not a FaceForensics++ split file (a JSON list of '
                           '[target, source] pairs, e.g. [["953", "974"], ...])')
        for a, b in pairs:
            for name in (a, b, f'{a}_{b}', f'{b}_{a}'):
                split_of[name] = split
    groups = [('original_sequences/youtube', 'FF-real')] + \
        [(f'manipulated_sequences/{m}', g) for m, g in FFPP_METHODS.items()]
    out, left_out = [], []
    for sub, group in groups:
        folder = os.path.join(root, sub, compression, 'videos')
        for path in _video_files(folder):
            name = os.path.splitext(os.path.basename(path))[0]
            if name not in split_of:
                left_out.append(f'{path} (in no split file)')
                continue
            out.append(RawVideo(path, f'{FFPP}/{sub}/{compression}', name, group,
                                (split_of[name],), compression))
    if not out:
        raise BadInput(f'{root}: no {FFPP} video at compression {compression!r} (looked in '
                       f'{root}/original_sequences/youtube/{compression}/videos and '
                       f'manipulated_sequences/<method>/{compression}/videos for methods '
                       f'{sorted(FFPP_METHODS)}); set --config.data.compression to the '
                       'folder you have (raw, c23, c40)')
    return out, left_out


def _cdf2(root: str) -> tuple[list[RawVideo], list[str]]:
    listing = os.path.join(root, CDF2_TEST_LIST)
    if not os.path.isfile(listing):
        raise InputNotFound(f'{CDF2} split file missing: {listing}; copy it from the '
                            f'{CDF2} release (it names the test videos)')
    test = set()
    with open(listing, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[0] not in ('0', '1'):
                raise BadInput(f'{listing} line {n}: {line.strip()!r} is not "<1|0> '
                               '<folder>/<video>.mp4"')
            folder, _, file = parts[1].replace('\\', '/').rpartition('/')
            test.add((folder.split('/')[0], os.path.splitext(file)[0]))
    out = []
    for folder, group in CDF2_FOLDERS.items():
        base = os.path.join(root, folder)
        files = _video_files(os.path.join(base, 'videos')) or _video_files(base)
        for path in files:
            name = os.path.splitext(os.path.basename(path))[0]
            splits = ('test', 'val') if (folder, name) in test else ('train',)
            out.append(RawVideo(path, f'{CDF2}/{folder}', name, group, splits))
    if not out:
        raise BadInput(f'{root}: no video in {", ".join(CDF2_FOLDERS)}; expected {EXPECTED}')
    return out, []


def sample_indices(count: int, num_frames: int) -> list[int]:
    """DeepfakeBench's fixed_num_frames rule: np.linspace(0, count - 1, num_frames) as ints
    (first and last frame included), each index once; every frame when num_frames is 0."""
    if count <= 0:
        return []
    if num_frames <= 0 or num_frames >= count:
        return list(range(count))
    return sorted({int(i) for i in np.linspace(0, count - 1, num_frames, endpoint=True,
                                               dtype=int)})


def settings(cropper: faces.FaceCropper, num_frames: int) -> dict:
    """What decides a video's stored frames; a status file made with other settings is stale
    (its video is redone), so one tree never mixes two crops."""
    return {'num_frames': int(num_frames), 'detector': cropper.detector,
            'landmarks': cropper.landmark_model, 'size': cropper.size, 'scale': cropper.scale,
            'upsample': cropper.upsample}


def preprocess_video(video: RawVideo, out_root: str, status_path: str, num_frames: int,
                     cropper: faces.FaceCropper, frames_dir: str = 'frames',
                     landmarks_dir: str = 'landmarks') -> dict:
    """Frames and landmarks of one video, then its status file (the last write: a video with
    a status file is finished; one without is redone from scratch).

    The frames are written into hidden `.NAME.partial` folders and renamed into place when the
    video is done, so a kill leaves either a whole video or a partial folder the next run
    removes; the status JSON is written atomically (fmsd_jax/atomic.py)."""
    t0 = time.perf_counter()
    base = os.path.join(out_root, video.where)
    final = {d: os.path.join(base, d, video.name) for d in (frames_dir, landmarks_dir)}
    partial = {d: os.path.join(base, d, f'.{video.name}.partial') for d in final}
    for path in (*final.values(), *partial.values()):
        shutil.rmtree(path, ignore_errors=True)
    count = vid.frame_count(video.path) if os.path.getsize(video.path) > 0 else 0
    wanted = sample_indices(count, num_frames)
    saved, no_face, decoded = [], [], 0
    for d in partial.values():
        os.makedirs(d, exist_ok=True)
    for index, rgb in vid.read_frames(video.path, wanted):
        decoded += 1
        face = cropper.crop(rgb)
        if not face.found:
            no_face.append(index)
            continue
        ok, png = cv2.imencode('.png', cv2.cvtColor(face.image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f'PNG encoding of frame {index} of {video.path} failed')
        with open(os.path.join(partial[frames_dir], f'{index:03d}.png'), 'wb') as f:
            f.write(png.tobytes())
        np.save(os.path.join(partial[landmarks_dir], f'{index:03d}.npy'), face.crop_landmarks)
        saved.append(index)
    status = 'done' if saved else ('no_face' if decoded else 'unreadable')
    if saved:
        for d in (landmarks_dir, frames_dir):  # frames last: their folder marks the video
            os.replace(partial[d], final[d])
    else:
        for d in partial.values():
            shutil.rmtree(d, ignore_errors=True)
    result = {'video': video.path, 'settings': settings(cropper, num_frames),
              'status': status, 'frames': saved,
              'no_face_frames': no_face, 'decoded': decoded, 'asked': len(wanted),
              'frame_count': count, 'seconds': round(time.perf_counter() - t0, 3)}
    if status == 'unreadable':
        result['reason'] = ('0-byte file' if os.path.getsize(video.path) == 0 else
                            'no decodable frame' if count == 0 or not decoded else '')
    atomic.write_json(status_path, result)
    return result


def read_status(status_path: str, video: RawVideo, out_root: str, want: dict,
                frames_dir: str = 'frames') -> dict | None:
    """The finished video's status, or None when it must be (re)done: no status file, a
    damaged one, one made with other `settings` than `want`, or a 'done' whose frames folder
    is gone."""
    try:
        with open(status_path, encoding='utf-8') as f:
            status = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(status, dict) or status.get('video') != video.path or \
            status.get('settings') != want:
        return None
    if status.get('status') == 'done' and not os.path.isdir(
            os.path.join(out_root, video.where, frames_dir, video.name)):
        return None
    return status


def dataset_json(dataset: str, videos: list[RawVideo], statuses: dict[str, dict],
                 frames_dir: str = 'frames') -> dict:
    """The DeepfakeBench JSON (rearrange.py's layout) of the finished videos, frame paths
    relative to the output root (config.data.dataset_root): {dataset: {label_group: {split:
    {[comp:] {video: {'label', 'frames'}}}}}}; every group has every split (empty if need be)
    so that a split the config reads is always present."""
    groups: dict[str, dict] = {}
    comps = sorted({v.compression for v in videos})
    for v in videos:
        groups.setdefault(v.label_group, {})
    for g in groups:
        for split in FFPP_SPLITS:
            groups[g][split] = {c: {} for c in comps} if dataset == FFPP else {}
    for v in videos:
        s = statuses.get(v.key)
        if not s or s['status'] != 'done':
            continue
        entry = {'label': v.label_group,
                 'frames': [f'{v.where}/{frames_dir}/{v.name}/{i:03d}.png' for i in s['frames']]}
        for split in v.splits:
            node = groups[v.label_group][split]
            (node[v.compression] if dataset == FFPP else node)[v.name] = entry
    return {dataset: groups}
