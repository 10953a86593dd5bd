"""A TFDS builder that packs any of our sources into ArrayRecord files.

Tens of thousands of small PNGs are slow on network disks and object stores (a Cloud TPU
VM reading from GCS); a handful of ArrayRecord shards with random access is not.  The
builder is manual-download style: the user's already-preprocessed data in `manual_dir`
(the dataset_root) is the input, nothing is fetched.  The records (frame sampling,
labels, video ids) are exactly those the file-backed source would give, and they are
read back through `tfds.data_source` (no TensorFlow needed: images are stored as PNG
bytes and decoded with Pillow).

    python -m fmsd_jax.data.tfds_builder --json_folder J --root R --dataset SynBlend --out D
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import re

import cv2
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from fmsd_jax import atomic
from fmsd_jax.data import file_records
from fmsd_jax.data import records as rec
from fmsd_jax.data import transforms as tr
from fmsd_jax.errors import InputNotFound, UnknownName
from fmsd_jax.pathnames import require_utf8

BUILDER_NAME = 'fmsd_frames'
COUNTS_FILE = 'fmsd_counts.json'
ARRAY_RECORD = 'TFDS ArrayRecord files (array_record)'
# Stored as the names' bytes (UTF-8, with a surrogate-escaped byte of a name that is not valid
# UTF-8 written back as that byte: tfds' Text feature would refuse the str) and read back with
# surrogateescape (sources.TfdsToRecord), so a packed record names the same file.
TEXT_KEYS = ('dataset', 'label_group', 'video_id', 'path')
_log = logging.getLogger(__name__)


def config_name(dataset: str) -> str:
    """TFDS config names allow [A-Za-z0-9_.-] only ('FaceForensics++' -> 'FaceForensics__')."""
    return re.sub(r'[^A-Za-z0-9_.-]', '_', dataset)


@dataclasses.dataclass(eq=False)
class FmsdFramesConfig(tfds.core.BuilderConfig):
    """Which source and dataset to pack; `data_cfg_json` is config.data as JSON (the
    builder must be reconstructible from plain values)."""

    dataset: str = ''
    data_cfg_json: str = '{}'
    splits: tuple[str, ...] = ('train', 'val', 'test')
    image_size: int = 0  # 0: store frames at their stored resolution


class FmsdFrames(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Frames of one deepfake dataset with label, dataset, label group and video id.

    Not registered by name: it is read back with builder_from_directory, and staying
    unregistered lets `python -m` run this file without a duplicate-name error."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        'manual_dir is the dataset_root of your data: DeepfakeBench frames (with '
        'dataset_json_folder in the config), or <Dataset>/[<split>/]<class>/ folders of '
        'images or videos.')
    BUILDER_CONFIGS: list = []

    # tfds 4.9.10 locates a builder's code through `importlib_resources`, a package it
    # does not require; the file is known, so say where it is.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
            'label': tfds.features.Scalar(np.int64),
            'dataset': tfds.features.Text(),
            'label_group': tfds.features.Text(),
            'video_id': tfds.features.Text(),
            'path': tfds.features.Text(),
        }), supervised_keys=('image', 'label'))

    def _data_cfg(self, root: str):
        import ml_collections
        cfg = ml_collections.ConfigDict(json.loads(self.builder_config.data_cfg_json))
        if root:
            cfg.dataset_root = root
        return cfg

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = os.fspath(dl_manager.manual_dir) if dl_manager.manual_dir else ''
        cfg = self._data_cfg(root)
        out, self._counts = {}, {}
        for split in self.builder_config.splits:
            try:
                records = file_records.list_records(cfg, self.builder_config.dataset, split)
            except KeyError as e:
                if 'has no split' not in str(e):
                    raise
                _log.warning('%s: skipping split %s (%s)', self.builder_config.dataset, split, e)
                continue
            self._counts[split] = rec.summarise(records)
            out[split] = self._generate_examples(cfg, records)
        if not out:
            raise ValueError(f'no split of {self.builder_config.dataset!r} could be read.')
        return out

    def _generate_examples(self, cfg, records: list[dict]):
        size = int(self.builder_config.image_size)
        reader = tr.ImageReader(size, cfg.video.face_margin, cfg.video.detect_faces,
                                cfg.video.min_face_fraction)
        bad = 0
        for i, r in enumerate(records):
            image = reader(r)
            if image is None:
                bad += 1
                _log.warning('unreadable, not packed: %s', r['path'])
                continue
            ok, png = cv2.imencode('.png', cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if not ok:
                raise RuntimeError(f'PNG encoding failed for {r["path"]}')
            yield i, {'image': png.tobytes(), 'label': r['label'],
                      **{k: r[k].encode('utf-8', 'surrogateescape') for k in TEXT_KEYS}}
        if bad:
            _log.warning('%d unreadable images skipped', bad)


def _plain(data_cfg) -> dict:
    d = data_cfg.to_dict() if hasattr(data_cfg, 'to_dict') else dict(data_cfg)
    d = copy.deepcopy(d)

    def fix(x):
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return [fix(v) for v in x]
        return x
    return fix(d)


def build_tfds(data_cfg, dataset: str, *, data_dir: str | None = None,
               splits: tuple[str, ...] = ('train', 'val', 'test'), image_size: int = 0,
               ) -> str:
    """Packs `dataset` (read with data_cfg.source) into ArrayRecord files under
    `data_dir` (default data_cfg.tfds.data_dir) and returns the builder directory.
    Frames are sampled per config.data.frame_num as the file-backed source would."""
    data_dir = os.fspath(data_dir or data_cfg.tfds.data_dir)
    if not data_dir:
        raise ValueError('build_tfds needs data_dir (or config.data.tfds.data_dir).')
    require_utf8(data_dir, 'the TFDS data_dir', ARRAY_RECORD)
    plain = _plain(data_cfg)
    plain['frame_num'] = dict(plain['frame_num'])
    config = FmsdFramesConfig(name=config_name(dataset), dataset=dataset,
                              data_cfg_json=json.dumps(plain), splits=tuple(splits),
                              image_size=int(image_size),
                              version=data_cfg.tfds.version)
    builder = FmsdFrames(config=config, data_dir=data_dir, file_format='array_record')
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(data_cfg.dataset_root) or None))
    builder_dir = os.fspath(builder.data_path)
    counts = getattr(builder, '_counts', None)
    if counts:
        atomic.write_json(os.path.join(builder_dir, COUNTS_FILE), counts, sort_keys=False)
    return builder_dir


def builder_dir(data_cfg, dataset: str) -> str:
    """Where a packed dataset lives; refused up front (every TFDS run asks for it before its
    first step) when array_record could not open it."""
    require_utf8(data_cfg.tfds.data_dir, 'config.data.tfds.data_dir', ARRAY_RECORD)
    return os.path.join(os.fspath(data_cfg.tfds.data_dir), BUILDER_NAME,
                        config_name(dataset), data_cfg.tfds.version)


def tfds_data_source(data_cfg, dataset: str, split: str):
    """(random-access source of examples, counts) for one split of a packed dataset."""
    path = builder_dir(data_cfg, dataset)
    if not os.path.isdir(path):
        raise InputNotFound(
            f'no TFDS dataset for {dataset!r} at {path}; pack it first with '
            'fmsd_jax.data.tfds_builder.build_tfds (or its command) and set '
            '--config.data.tfds.data_dir.')
    builder = tfds.builder_from_directory(path)
    if split not in builder.info.splits:
        raise UnknownName(f'{path}: dataset {dataset!r} has no split {split!r} '
                          f'(have {sorted(builder.info.splits)}).')
    source = builder.as_data_source(split=split)
    counts_path = os.path.join(path, COUNTS_FILE)
    n = len(source)
    info = {'frames': n, 'videos': n, 'real': 0, 'fake': 0}
    if os.path.isfile(counts_path):
        with open(counts_path, encoding='utf-8') as f:
            info = json.load(f).get(split, info)
        info['frames'] = n  # unreadable frames were not packed
    return source, info


def main(argv=None) -> None:
    from fmsd_jax.data.config import get_data_config
    p = argparse.ArgumentParser(prog='python -m fmsd_jax.data.tfds_builder',
                                description='Pack a dataset into TFDS ArrayRecord files.')
    p.add_argument('--dataset', required=True)
    p.add_argument('--out', required=True, help='TFDS data_dir')
    p.add_argument('--source', default='deepfakebench', choices=file_records.FILE_SOURCES)
    p.add_argument('--root', required=True, help='dataset_root (the manual_dir)')
    p.add_argument('--json_folder', default='', help='DeepfakeBench dataset_json_folder')
    p.add_argument('--frame_num', type=int, default=8, help='frames per video, 0 = all')
    p.add_argument('--image_size', type=int, default=0, help='resize when packing; 0 = keep')
    args = p.parse_args(argv)
    cfg = get_data_config()
    cfg.source, cfg.dataset_root = args.source, args.root
    cfg.dataset_json_folder = args.json_folder
    cfg.frame_num.train = cfg.frame_num.test = args.frame_num
    cfg.tfds.data_dir = args.out
    # Under `python -m` this file is __main__, which TFDS cannot register a builder from;
    # use the builder from the importable module.
    from fmsd_jax.data import tfds_builder
    print(tfds_builder.build_tfds(cfg, args.dataset, image_size=args.image_size))


if __name__ == '__main__':
    main()
