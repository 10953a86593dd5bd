"""Datasets that are plain folders of images or of video files.

`<dataset_root>/<Dataset>/[<split>/]<class>/...` where `<class>` is `real`/`fake` or one
folder per forgery method (its label from `label_dict`, then `folder.labels`).  Inside a
class folder, an image file is a one-frame video and a subfolder of images is a video;
for the video source each video file is a video.
"""

from __future__ import annotations

import os
import zlib

from fmsd_jax.data import records as rec
from fmsd_jax.data import video as vid
from fmsd_jax.errors import BadInput, InputNotFound, UnknownName

SPLITS = ('train', 'val', 'test')


def _label_of(name: str, data_cfg, where: str) -> int:
    for table in (data_cfg.label_dict, data_cfg.folder.labels):
        if name in table:
            return int(table[name])
    raise UnknownName(f'{where}: no label for class folder {name!r}; name it real/fake or add '
                      f"c.data.folder.labels['{name}'] = 0 or 1 in the config.")


def hash_split(key: str, fractions: tuple[float, ...]) -> str:
    """Stable train/val/test assignment by video, so that frames of one video never sit on
    both sides of a split and the assignment survives adding files. The key is hashed as the
    name's bytes: UTF-8 for a valid name (the assignment every existing dataset has), and the
    original bytes of a surrogate-escaped one (`caf\\udce9` hashes as b'caf\\xe9'), whatever
    the locale."""
    u = zlib.crc32(key.encode('utf-8', 'surrogateescape')) / 2.0**32
    total = float(sum(fractions))
    acc = 0.0
    for name, frac in zip(SPLITS, fractions, strict=True):
        acc += frac / total
        if u < acc:
            return name
    return SPLITS[-1]


def _is_ext(name: str, exts) -> bool:
    return os.path.splitext(name)[1].lower() in tuple(e.lower() for e in exts)


def folder_records(data_cfg, dataset: str, split: str, *, frame_num: int | None,
                   videos: bool = False) -> list[dict]:
    """Records of one split of a folder dataset; `videos=True` reads video files."""
    root = os.path.join(os.fspath(data_cfg.dataset_root), dataset)
    if not os.path.isdir(root):
        raise InputNotFound(f'{data_cfg.source} dataset {dataset!r}: folder {root} does '
                            'not exist; set --config.data.dataset_root.')
    by_dir = os.path.isdir(os.path.join(root, split))
    base = os.path.join(root, split) if by_dir else root
    if not by_dir and any(os.path.isdir(os.path.join(root, s)) for s in SPLITS):
        raise InputNotFound(f'{root} has split folders but no {split!r} folder.')
    fractions = tuple(data_cfg.folder.split_fractions)
    out: list[dict] = []
    for cls in sorted(os.listdir(base)):
        cdir = os.path.join(base, cls)
        if not os.path.isdir(cdir):
            continue
        label = _label_of(cls, data_cfg, base)
        for entry in sorted(os.listdir(cdir)):
            full = os.path.join(cdir, entry)
            video_id = f'{cls}/{os.path.splitext(entry)[0]}'
            if not by_dir and hash_split(f'{dataset}/{video_id}', fractions) != split:
                continue
            if videos:
                if not _is_ext(entry, data_cfg.folder.video_extensions):
                    continue
                n = vid.frame_count(full)
                if n == 0:
                    raise BadInput(f'{full}: no decodable frames (dataset {dataset!r}).')
                for i in rec.even_indices(n, frame_num):
                    out.append(rec.make_record(full, label, dataset, cls, video_id, int(i)))
            elif os.path.isdir(full):
                frames = rec.sort_frames(
                    os.path.join(full, f) for f in os.listdir(full)
                    if _is_ext(f, data_cfg.folder.image_extensions))
                for i in rec.even_indices(len(frames), frame_num):
                    out.append(rec.make_record(frames[i], label, dataset, cls, video_id))
            elif _is_ext(entry, data_cfg.folder.image_extensions):
                out.append(rec.make_record(full, label, dataset, cls, video_id))
    if not out:
        raise BadInput(f'{base}: no {"videos" if videos else "images"} found for split '
                       f'{split!r} of dataset {dataset!r}.')
    return out
