"""Records of the file-backed sources (DeepfakeBench JSON, image folders, video folders).

Kept apart from `sources` so that the TFDS packer, which turns these records into ArrayRecord
files, and `sources`, which reads those files back, both build on it without importing each
other.
"""

from __future__ import annotations

from fmsd_jax.data.deepfakebench import deepfakebench_records
from fmsd_jax.data.folder import folder_records
from fmsd_jax.errors import BadInput

SOURCES = ('deepfakebench', 'folder', 'video', 'tfds')
FILE_SOURCES = SOURCES[:3]


def split_frame_num(data_cfg, split: str) -> int | None:
    """config.data.frame_num for a split: `train` for 'train', `test` for every other, as
    DeepfakeBench; an optional `val` key (not DeepfakeBench's) serves 'val' when set."""
    fn = data_cfg.frame_num
    if split == 'train':
        return int(fn.train)
    if split == 'val' and fn.get('val') is not None:
        return int(fn.val)
    return int(fn.test)


def list_records(data_cfg, dataset: str, split: str, *,
                 frame_num: int | None = -1) -> list[dict]:
    """Records (records.RECORD_KEYS) of one split; `frame_num=-1` takes config.data.frame_num
    (train for 'train', test otherwise), `None` keeps every frame."""
    if frame_num == -1:
        frame_num = split_frame_num(data_cfg, split)
    source = data_cfg.source
    if source == 'deepfakebench':
        return deepfakebench_records(data_cfg, dataset, split, frame_num=frame_num)
    if source in ('folder', 'video'):
        return folder_records(data_cfg, dataset, split, frame_num=frame_num,
                              videos=source == 'video')
    if source == 'tfds':
        raise ValueError('list_records reads file-backed sources; TFDS records live in '
                         'ArrayRecord files, use sources.record_dataset().')
    raise BadInput(f'config.data.source={source!r}; expected one of {SOURCES}.')
