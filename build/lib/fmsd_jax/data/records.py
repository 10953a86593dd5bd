"""What every source produces: a flat list of per-frame records, and the rules shared by
all sources for choosing and naming frames.

A record is a plain dict (picklable, cheap to send to grain workers) with keys
`path` (str, absolute or cwd-relative), `frame_index` (int: -1 for an image file, the
frame number for a video file), `label` (int), `dataset`, `label_group` and `video_id`
(str).  Sources return records; the pipeline decides how to read them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

from fmsd_jax.errors import InputNotFound

RECORD_KEYS = ('path', 'frame_index', 'label', 'dataset', 'label_group', 'video_id')

_LAST_INT = re.compile(r'(\d+)(?!.*\d)')


def make_record(path: str, label: int, dataset: str, label_group: str, video_id: str,
                frame_index: int = -1) -> dict:
    return {'path': str(path), 'frame_index': int(frame_index), 'label': int(label),
            'dataset': str(dataset), 'label_group': str(label_group),
            'video_id': str(video_id)}


def normalise_path(path: str, root: str | os.PathLike | None) -> str:
    """DeepfakeBench writes its JSONs on Windows (`a\\b\\000.png`); accept both separators
    and resolve relative paths against `dataset_root` rather than the working directory."""
    p = str(path).replace('\\', '/')
    if root and not os.path.isabs(p):
        p = os.path.join(os.fspath(root), p)
    return p


def frame_sort_key(path: str) -> tuple:
    """Frame files are named by integers (`0.png` … `31.png`, or `000.png`), so lexical
    order puts `10.png` before `2.png`; order by the last integer in the file stem."""
    stem = os.path.splitext(os.path.basename(str(path).replace('\\', '/')))[0]
    m = _LAST_INT.search(stem)
    return (0, int(m.group(1)), stem) if m else (1, 0, stem)


def sort_frames(paths: Iterable[str]) -> list[str]:
    return sorted(paths, key=frame_sort_key)


def even_indices(total: int, num: int | None) -> np.ndarray:
    """Indices of `num` frames spread evenly over `total`: `i * total // num`.

    DeepfakeBench intends `step = total // frame_num` but sets `total = frame_num` first and
    so always takes the first frames of a video (the opening second of a clip), which
    under-represents the video.  With 32 stored frames and 8 requested this yields
    0, 4, …, 28, what DeepfakeBench meant.  A video with fewer frames than requested
    keeps all of them (DeepfakeBench issue #127) instead of failing or repeating frames.
    """
    if total <= 0:
        return np.zeros((0,), np.int64)
    if num is None or num <= 0 or num >= total:
        return np.arange(total, dtype=np.int64)
    return (np.arange(num, dtype=np.int64) * total) // num


def check_exist(records: Sequence[dict], where: str, hint: str = '') -> None:
    """Fail at start-up, not hours into training, and say which files and how many."""
    missing = [r['path'] for r in records if not os.path.exists(r['path'])]
    if missing:
        raise InputNotFound(
            f'{where}: {len(missing)} of {len(records)} frame files are missing, the first '
            f'{missing[0]}. {hint}'.rstrip())


def summarise(records: Sequence[dict]) -> dict[str, int]:
    """Counts that a trainer logs and uses for steps per epoch."""
    labels = np.array([r['label'] for r in records], np.int64)
    return {'frames': len(records), 'videos': len({(r['dataset'], r['video_id'])
                                                   for r in records}),
            'real': int((labels == 0).sum()), 'fake': int((labels != 0).sum())}
