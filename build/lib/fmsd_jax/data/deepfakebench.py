"""DeepfakeBench's preprocessed datasets, read from its own JSON files.

Layout (`preprocessing/rearrange.py`):
`{Dataset: {label_group: {split: {[c23|c40|raw:] {video: {"label", "frames", "masks"}}}}}}`.
The compression level exists for the FF family only, so it is detected by the keys
found under a split rather than by the dataset's name.

A frame whose name is not valid UTF-8 (a Latin-1 `caf\\xe9.png`) reaches the JSON in one of
two forms, and both name the file on disk: DeepfakeBench's `json.dump` (ensure_ascii) writes
the surrogate-escaped str Python listed it as, `"caf\\udce9.png"`, which `json.load` gives
back; a writer that keeps raw bytes leaves the byte itself in the file, which is read with
`surrogateescape` into the same str. Either way `os.fsencode` of the path is the file's name.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping

from fmsd_jax.data import records as rec
from fmsd_jax.errors import BadInput, InputNotFound, UnknownName

COMPRESSION_KEYS = frozenset({'raw', 'c23', 'c40'})


@functools.lru_cache(maxsize=16)
def _read_json(path: str, mtime: float) -> dict:
    del mtime  # part of the cache key so that a rewritten JSON is re-read
    with open(path, encoding='utf-8', errors='surrogateescape') as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise BadInput(f'{path} is not valid JSON ({e}); regenerate it with '
                           "DeepfakeBench's preprocessing/rearrange.py") from None


def json_path(json_folder: str, dataset: str) -> str:
    return os.path.join(os.fspath(json_folder), f'{dataset}.json')


def load_dataset_json(json_folder: str, dataset: str) -> dict:
    """Returns `{label_group: {split: ...}}` for one dataset."""
    path = json_path(json_folder, dataset)
    if not os.path.isfile(path):
        have = sorted(f[:-5] for f in os.listdir(json_folder) if f.endswith('.json')) \
            if os.path.isdir(json_folder) else []
        raise InputNotFound(
            f'DeepfakeBench JSON for dataset {dataset!r} not found: {path}. '
            f'Datasets in {json_folder!r}: {have or "none (is dataset_json_folder right?)"}. '
            'Set --config.data.dataset_json_folder=PATH or fix the dataset name.')
    data = _read_json(path, os.path.getmtime(path))
    if not isinstance(data, dict) or dataset not in data:
        keys = sorted(data) if isinstance(data, dict) else f'a JSON {type(data).__name__}'
        raise UnknownName(f'{path} has no top-level key {dataset!r} (keys: {keys}); '
                          'DeepfakeBench JSONs are keyed by the dataset name.')
    _check_layout(data[dataset], path, dataset)
    return data[dataset]


def _check_layout(groups, path: str, dataset: str) -> None:
    """{label_group: {split: {[compression:] {video: {'frames': [...]}}}}}, or one line that
    names the first place where the JSON holds something else (a hand-edited or foreign JSON
    would otherwise fail deep inside with an AttributeError)."""
    def bad(where: str, what: str, value) -> BadInput:
        return BadInput(f'{path}: {where} is a JSON {type(value).__name__}, expected {what} '
                        "(DeepfakeBench's layout: {dataset: {label_group: {split: {video: "
                        '{"frames": [...]}}}}})')

    if not isinstance(groups, dict):
        raise bad(dataset, 'an object of label groups', groups)
    for group, splits in groups.items():
        if not isinstance(splits, dict):
            raise bad(f'{dataset}/{group}', 'an object of splits', splits)
        for split, videos in splits.items():
            where = f'{dataset}/{group}/{split}'
            if not isinstance(videos, dict):
                raise bad(where, 'an object of videos', videos)
            by_level = videos and set(videos) <= COMPRESSION_KEYS  # the FF family's c23/c40
            for level, vids in (videos.items() if by_level else [('', videos)]):
                if not isinstance(vids, dict):
                    raise bad(f'{where}/{level}', 'an object of videos', vids)
                for video, entry in vids.items():
                    if not isinstance(entry, dict) or not isinstance(entry.get('frames', []),
                                                                     list):
                        raise bad(f'{where}/{level + "/" if level else ""}{video}',
                                  'an object with a "frames" list', entry)


def _videos_of(split_dict: Mapping, compression: str, where: str) -> Mapping:
    keys = set(split_dict)
    if keys and keys <= COMPRESSION_KEYS:
        if compression not in split_dict:
            raise UnknownName(f'{where}: compression {compression!r} not present '
                              f'(have {sorted(keys)}); set --config.data.compression.')
        return split_dict[compression]
    return split_dict


def deepfakebench_records(data_cfg, dataset: str, split: str, *,
                          frame_num: int | None = None) -> list[dict]:
    """One record per sampled frame of every video in `split` of `dataset`.

    `frame_num` frames are taken evenly across each video (records.even_indices); `None`
    or 0 keeps every frame.
    """
    json_folder = os.fspath(data_cfg.dataset_json_folder)
    path = json_path(json_folder, dataset)
    groups = load_dataset_json(json_folder, dataset)
    label_dict = dict(data_cfg.label_dict)
    missing_split = [g for g in groups if split not in groups[g]]
    if missing_split:
        have = sorted({s for g in groups.values() for s in g})
        raise UnknownName(f'{path}: dataset {dataset!r} has no split {split!r} in label '
                          f'group(s) {missing_split}; splits present: {have}.')
    out: list[dict] = []
    for group in sorted(groups):
        if group not in label_dict:
            raise UnknownName(f'{path}: label group {group!r} of dataset {dataset!r} is not in '
                              'config.data.label_dict; add it in the config '
                              f"(c.data.label_dict['{group}'] = 0 or 1).")
        label = int(label_dict[group])
        where = f'{path} [{dataset}/{group}/{split}]'
        videos = _videos_of(groups[group][split], data_cfg.compression, where)
        for video in sorted(videos):
            frames = rec.sort_frames(videos[video].get('frames') or [])
            for i in rec.even_indices(len(frames), frame_num):
                out.append(rec.make_record(
                    rec.normalise_path(frames[i], data_cfg.dataset_root), label, dataset,
                    group, f'{group}/{video}'))
    if not out:
        raise BadInput(f'{path}: split {split!r} of dataset {dataset!r} has no frames.')
    if data_cfg.check_files:
        rec.check_exist(out, f'{path} [dataset {dataset!r}, split {split!r}]',
                        f'Frame paths are resolved against dataset_root='
                        f'{data_cfg.dataset_root!r}; set --config.data.dataset_root.')
    return out
