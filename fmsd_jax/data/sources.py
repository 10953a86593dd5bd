"""One entry point from (config, dataset name, split) to a random-access dataset of records,
whatever the source, so the pipeline never branches on where the pixels live."""

from __future__ import annotations

import grain

from fmsd_jax.data import records as rec

SOURCES = ('deepfakebench', 'folder', 'video', 'tfds')


def _frame_num(data_cfg, split: str) -> int | None:
    fn = data_cfg.frame_num
    return int(fn.train if split == 'train' else fn.test)


def list_records(data_cfg, dataset: str, split: str, *,
                 frame_num: int | None = -1) -> list[dict]:
    """Records (records.RECORD_KEYS) of one split; `frame_num=-1` takes config.data.frame_num
    (train for 'train', test otherwise), `None` keeps every frame."""
    if frame_num == -1:
        frame_num = _frame_num(data_cfg, split)
    source = data_cfg.source
    if source == 'deepfakebench':
        from fmsd_jax.data.deepfakebench import deepfakebench_records
        return deepfakebench_records(data_cfg, dataset, split, frame_num=frame_num)
    if source in ('folder', 'video'):
        from fmsd_jax.data.folder import folder_records
        return folder_records(data_cfg, dataset, split, frame_num=frame_num,
                              videos=source == 'video')
    if source == 'tfds':
        raise ValueError('list_records reads file-backed sources; TFDS records live in '
                         'ArrayRecord files, use record_dataset().')
    raise ValueError(f'config.data.source={source!r}; expected one of {SOURCES}.')


def has_split(data_cfg, dataset: str, split: str) -> bool:
    """Whether `split` exists for `dataset` (DeepfakeBench ships no 'val' for most test
    sets, so validation must be able to ask before it reads)."""
    source = data_cfg.source
    if source == 'deepfakebench':
        from fmsd_jax.data.deepfakebench import load_dataset_json
        groups = load_dataset_json(data_cfg.dataset_json_folder, dataset)
        return bool(groups) and all(split in g for g in groups.values())
    if source == 'tfds':
        import os

        from fmsd_jax.data.tfds_builder import builder_dir
        path = builder_dir(data_cfg, dataset)
        if not os.path.isdir(path):
            return False
        import tensorflow_datasets as tfds
        return split in tfds.builder_from_directory(path).info.splits
    try:
        return bool(list_records(data_cfg, dataset, split, frame_num=1))
    except (FileNotFoundError, ValueError):
        return False


class TfdsToRecord(grain.transforms.Map):
    """Turns a TFDS example (as tfds_builder writes it) into a record with decoded pixels."""

    def map(self, ex: dict) -> dict:
        def s(x):
            return x.decode('utf-8') if isinstance(x, bytes) else str(x)
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
