"""One entry point from (config, dataset name, split) to a random-access dataset of records,
whatever the source, so the pipeline never branches on where the pixels live."""

from __future__ import annotations

import os

import grain

from fmsd_jax.data import records as rec
from fmsd_jax.data.deepfakebench import load_dataset_json
from fmsd_jax.data.file_records import SOURCES, list_records

__all__ = ['SOURCES', 'TfdsToRecord', 'has_split', 'list_records', 'record_dataset']


def has_split(data_cfg, dataset: str, split: str) -> bool:
    """Whether `split` exists for `dataset` (DeepfakeBench ships no 'val' for most test
    sets, so validation must be able to ask before it reads)."""
    source = data_cfg.source
    if source == 'deepfakebench':
        groups = load_dataset_json(data_cfg.dataset_json_folder, dataset)
        return bool(groups) and all(split in g for g in groups.values())
    if source == 'tfds':
        # TensorFlow Datasets is heavy and only TFDS runs need it: imported on use.
        import tensorflow_datasets as tfds

        from fmsd_jax.data.tfds_builder import builder_dir
        path = builder_dir(data_cfg, dataset)
        if not os.path.isdir(path):
            return False
        return split in tfds.builder_from_directory(path).info.splits
    try:
        return bool(list_records(data_cfg, dataset, split, frame_num=1))
    except (FileNotFoundError, ValueError):
        return False


class TfdsToRecord(grain.transforms.Map):
    """Turns a TFDS example (as tfds_builder writes it) into a record with decoded pixels;
    text is decoded with surrogateescape, so a name that is not valid UTF-8 comes back as the
    str the file-backed source listed it as."""

    def map(self, ex: dict) -> dict:
        def s(x):
            return x.decode('utf-8', 'surrogateescape') if isinstance(x, bytes) else str(x)
        out = rec.make_record(s(ex['path']), int(ex['label']), s(ex['dataset']),
                              s(ex['label_group']), s(ex['video_id']))
        out['image'] = ex['image']
        return out


def record_dataset(data_cfg, datasets: str | tuple[str, ...], split: str
                   ) -> tuple[grain.MapDataset, dict]:
    """A MapDataset of records over one or several datasets, and its summary counts
    (frames, videos, real, fake) that a trainer needs for steps per epoch."""
    if isinstance(datasets, str):
        datasets = (datasets,)
    if data_cfg.source == 'tfds':
        # Heavy (TensorFlow Datasets) and TFDS-only: imported on use.
        from fmsd_jax.data.tfds_builder import tfds_data_source
        parts, frames, videos, fake = [], 0, 0, 0
        for name in datasets:
            src, info = tfds_data_source(data_cfg, name, split)
            parts.append(grain.MapDataset.source(src).map(TfdsToRecord()))
            frames += info['frames']
            videos += info['videos']
            fake += info['fake']
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
        return ds, {'frames': frames, 'videos': videos, 'real': frames - fake, 'fake': fake}
    records: list[dict] = []
    for name in datasets:
        records.extend(list_records(data_cfg, name, split))
    return grain.MapDataset.source(records), rec.summarise(records)
