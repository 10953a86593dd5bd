"""grain pipelines for training and evaluation.

Training: records -> this process's shard -> per-epoch shuffle -> repeat forever -> read
(skipping unreadable files) -> DeepfakeBench augmentation -> batch -> worker processes.
Everything random is keyed by (seed, position in the stream), so a run is reproducible and a
restored iterator continues with the same batches.

Evaluation: records -> pad to a whole number of global batches -> this shard's block ->
read -> batch; padding and unreadable frames carry valid=False so every batch has the same
shape under jit.

Images leave as uint8 RGB: CLIP normalisation runs on the device (model.detector.Detector),
where it is free, instead of costing the host a float pass per pixel and four times the
bytes to transfer (issue 7: host work must not limit the step).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from fmsd_jax.data import sources
from fmsd_jax.data import transforms as tr
from fmsd_jax.errors import BadInput, UserError

_MAX_BAD_PATHS = 20


class UnreadableDataError(UserError, RuntimeError):
    """Too large a share of the images could not be read."""


def _meta(record: dict) -> dict:
    return {k: record[k] for k in ('video_id', 'dataset', 'label_group', 'path')}


class _TrainElements(grain.MapDataset):
    """Reads the image of each record; an unreadable one is replaced by the next record of
    the (shuffled, repeated) stream, and the replacement is reported in `_skipped` so the
    main process can count it although the read happened in a worker."""

    def __init__(self, parent: grain.MapDataset, reader: tr.ImageReader, max_tries: int):
        super().__init__(parent)
        self._reader = reader
        self._max_tries = int(max_tries)

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return '_TrainElements'

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        bad = ''
        for k in range(self._max_tries + 1):
            record = self._parent[index + k]
            image = self._reader(record)
            if image is not None:
                return {'image': image, 'label': np.int32(record['label']),
                        '_skipped': np.int32(k), '_bad': bad}
            bad = record['path']
        raise UnreadableDataError(
            f'{self._max_tries + 1} consecutive training images are unreadable (last: {bad}); '
            'is config.data.dataset_root right, or is the data corrupt?')


class _EvalElements(grain.MapDataset):
    """Pads the records to `length` and reads them; padding and unreadable frames get a
    black image and valid=False so evaluation keeps static shapes and ignores them."""

    def __init__(self, parent: grain.MapDataset, reader: tr.ImageReader, length: int,
                 offset: int, size: int):
        super().__init__(parent)
        self._reader = reader
        self._length = int(length)
        self._offset = int(offset)
        self._size = int(size)

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return '_EvalElements'

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        g = self._offset + index
        blank = np.zeros((self._size, self._size, 3), np.uint8)
        if g >= len(self._parent):
            return {'image': blank, 'label': np.int32(0), 'valid': np.bool_(False),
                    'video_id': '', 'dataset': '', 'label_group': '', 'path': '',
                    '_skipped': np.int32(0),
                    '_bad': ''}
        record = self._parent[g]
        image = self._reader(record)
        ok = image is not None
        return {'image': image if ok else blank, 'label': np.int32(record['label']),
                'valid': np.bool_(ok), **_meta(record), '_skipped': np.int32(not ok),
                '_bad': '' if ok else record['path']}


class _Accounting(grain.IterDataset):
    """Main-process stage that sums the skip reports of all workers and stops the run
    past config.data.max_unreadable_fraction."""

    def __init__(self, parent: grain.IterDataset, max_fraction: float, min_reads: int,
                 what: str, workers: int):
        super().__init__(parent)
        self._max_fraction = float(max_fraction)
        self._min_reads = int(min_reads)
        self._what = what
        self._workers = int(workers)

    def __str__(self) -> str:
        return '_Accounting'

    def __iter__(self) -> AccountingIterator:
        return AccountingIterator(self._parent.__iter__(), self._max_fraction,
                                  self._min_reads, self._what, self._workers)


class AccountingIterator(grain.DatasetIterator):
    """The iterator a trainer holds: `next()` gives a batch, `get_state()`/`set_state()`
    (JSON-serialisable, grain/orbax checkpointable) resume it, `stats()` reports reads."""

    def __init__(self, parent: grain.DatasetIterator, max_fraction: float, min_reads: int,
                 what: str, workers: int):
        super().__init__(parent)
        self._max_fraction = max_fraction
        self._min_reads = min_reads
        self._what = what
        self._workers = workers
        self._read = 0
        self._unreadable = 0
        self._bad_paths: list[str] = []

    def __next__(self) -> dict[str, Any]:
        batch = next(self._parent)
        skipped = int(np.sum(batch.pop('_skipped')))
        bad = batch.pop('_bad')
        # Padding and unreadable eval frames carry valid=False; neither counts as a read.
        self._read += int(np.sum(batch['valid'])) if 'valid' in batch else int(
            np.size(batch['label']))
        if skipped:
            self._unreadable += skipped
            for p in np.atleast_1d(bad):
                p = str(p)
                if p and p not in self._bad_paths and len(self._bad_paths) < _MAX_BAD_PATHS:
                    self._bad_paths.append(p)
        self._check()
        return batch

    def _check(self) -> None:
        total = self._read + self._unreadable
        if total >= self._min_reads and self._unreadable > self._max_fraction * total:
            raise UnreadableDataError(
                f'{self._what}: {self._unreadable} of {total} images were unreadable '
                f'({self._unreadable / total:.1%} > max_unreadable_fraction='
                f'{self._max_fraction}); first ones: {self._bad_paths[:5]}. Fix or remove '
                'them, or raise --config.data.max_unreadable_fraction.')

    def __enter__(self) -> AccountingIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        total = self._read + self._unreadable
        return {'read': self._read, 'unreadable': self._unreadable,
                'fraction': self._unreadable / total if total else 0.0,
                'bad_paths': list(self._bad_paths)}

    def get_state(self) -> dict[str, Any]:
        return {'pipeline': self._parent.get_state(), 'workers': self._workers,
                'counts': {'read': self._read, 'unreadable': self._unreadable,
                           'bad_paths': list(self._bad_paths)}}

    def set_state(self, state: dict[str, Any]) -> None:
        # grain's state is per worker process: restored into another worker count it either
        # fails deep inside grain or, worse, silently resumes a different data order.
        saved = state.get('workers', self._workers)  # absent in checkpoints before the field
        if saved != self._workers:
            raise BadInput(
                f'{self._what}: the checkpointed data iterator was written with {saved} grain '
                f'worker processes, this run has {self._workers}; resume with '
                f'--config.data.workers={saved} (data.workers=-1 picks a number per machine)')
        self._parent.set_state(state['pipeline'])
        counts = state['counts']
        self._read = int(counts['read'])
        self._unreadable = int(counts['unreadable'])
        self._bad_paths = list(counts['bad_paths'])


class _Loader:
    def __init__(self, dataset: grain.IterDataset, info: dict, local_batch_size: int):
        self._dataset = dataset
        self._last: AccountingIterator | None = None
        self.info = info
        self.num_records = info['frames']
        self.num_videos = info['videos']
        self.local_batch_size = local_batch_size

    def __iter__(self) -> AccountingIterator:
        self._last = iter(self._dataset)
        return self._last

    def unreadable_stats(self) -> dict[str, Any]:
        """Counts of the most recent iterator (read, unreadable, fraction, bad_paths)."""
        return self._last.stats() if self._last is not None else {
            'read': 0, 'unreadable': 0, 'fraction': 0.0, 'bad_paths': []}


def _read_options(data_cfg) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=int(data_cfg.read_threads),
                             prefetch_buffer_size=max(int(data_cfg.prefetch), 1))


def auto_workers(cores: int, accelerator: bool) -> int:
    """Worker processes for `workers=-1`. On a CPU backend the step already uses every core,
    so decoding in other processes only adds start-up time and contention: none. With an
    accelerator the host's only job is feeding it: keep one core for the loop (dispatch,
    transfers) and one more spare, and give each worker two (its read threads release
    the GIL in decode and most augmentations)."""
    return max(1, (cores - 2) // 2) if accelerator else 0


def resolve_workers(workers: int) -> int:
    """config.data.workers with -1 (auto) resolved for this process and backend."""
    workers = int(workers)
    if workers >= 0:
        return workers
    if workers != -1:
        raise ValueError(f'config.data.workers={workers}: use -1 (auto), 0 (main process) or '
                         'a number of worker processes')
    import jax  # the backend decides; nothing else here depends on JAX

    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (
        os.cpu_count() or 1)
    return auto_workers(cores, jax.default_backend() != 'cpu')


def _workers(ds: grain.IterDataset, data_cfg, workers: int) -> grain.IterDataset:
    if workers > 0:
        # grain's worker processes read absl flags; a library user (a notebook, pytest)
        # has not parsed any, and their defaults are what we want.
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers,
            per_worker_buffer_size=max(int(data_cfg.worker_buffer), 1)))
    return ds


class TrainLoader(_Loader):
    """Iterable over training batches forever; see make_train_loader."""

    def __init__(self, dataset: grain.IterDataset, info: dict, global_batch_size: int,
                 local_batch_size: int):
        super().__init__(dataset, info, local_batch_size)
        self.global_batch_size = global_batch_size
        self.steps_per_epoch = max(self.num_records // global_batch_size, 1)


def make_train_loader(data_cfg, *, global_batch_size: int, seed: int, shard_index: int = 0,
                      shard_count: int = 1) -> TrainLoader:
    """Batches `{'image': uint8 (B,H,W,3) RGB, 'label': i32 (B,)}` forever, with
    B = global_batch_size // shard_count; each process reads a disjoint 1/shard_count of
    the records (pass jax.process_index() / jax.process_count()).

    Deterministic per (seed, data, shard, workers): changing `workers` changes which
    records share a batch, not which records or augmentations appear. A checkpointed
    iterator resumes only under the worker count it was written with (a clear error
    otherwise); `workers=-1` resolves per machine (resolve_workers).
    """
    if global_batch_size % shard_count:
        raise ValueError(f'global_batch_size={global_batch_size} is not divisible by '
                         f'shard_count={shard_count}.')
    local = global_batch_size // shard_count
    records, info = sources.record_dataset(data_cfg, tuple(data_cfg.train_dataset), 'train')
    if len(records) < shard_count:
        raise ValueError(f'{len(records)} training records cannot feed {shard_count} shards.')
    seed = int(seed) % 2**32
    ds = records[shard_index::shard_count].shuffle(seed=seed).repeat(None)
    ds = _TrainElements(ds, tr.ImageReader.from_config(data_cfg),
                        int(data_cfg.max_consecutive_unreadable))
    if data_cfg.augment.enabled:
        ds = ds.random_map(tr.Augment(data_cfg.augment), seed=seed)
    it = ds.to_iter_dataset(_read_options(data_cfg)).batch(local, drop_remainder=True)
    workers = resolve_workers(data_cfg.workers)
    it = _Accounting(_workers(it, data_cfg, workers), data_cfg.max_unreadable_fraction,
                     min_reads=max(100, local), what=f'training data {data_cfg.train_dataset}',
                     workers=workers)
    return TrainLoader(it, info, global_batch_size, local)


class EvalLoader(_Loader):
    """Finite iterable of padded evaluation batches; see make_eval_loader."""

    def __init__(self, dataset: grain.IterDataset, info: dict, num_batches: int,
                 local_batch_size: int):
        super().__init__(dataset, info, local_batch_size)
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches


def num_records(loader: TrainLoader | EvalLoader) -> int:
    """Training (or evaluation) frames over all shards: steps per epoch = this // batch."""
    return int(loader.num_records)


def has_split(data_cfg, dataset_name: str, split: str) -> bool:
    """Whether `dataset_name` has `split` (most DeepfakeBench test sets have no 'val')."""
    return sources.has_split(data_cfg, dataset_name, split)


def make_eval_loader(data_cfg, dataset_name: str, *, split: str = 'test', batch_size: int,
                     shard_index: int = 0, shard_count: int = 1,
                     reader_wrapper: Callable[[tr.ImageReader, grain.MapDataset], Any]
                     | None = None) -> EvalLoader:
    """Every frame of `split` once, in a fixed order, no augmentation.

    `batch_size` is global (as in make_train_loader); each shard yields the same number of
    batches of batch_size // shard_count, the tail padded with valid=False.  Batches hold
    'image', 'label', 'valid' and host-side string arrays 'video_id', 'dataset',
    'label_group', 'path' (drop them before device_put).  Validation is split='val' of
    the training datasets.  `reader_wrapper(reader, records)` may replace the reader with a
    picklable one that alters the pixels (robustness perturbations), so the change runs in
    the same worker processes as the reading.
    """
    if batch_size % shard_count:
        raise ValueError(f'batch_size={batch_size} is not divisible by '
                         f'shard_count={shard_count}.')
    local = batch_size // shard_count
    records, info = sources.record_dataset(data_cfg, dataset_name, split)
    num_batches = max(math.ceil(len(records) / batch_size), 1)
    per_shard = num_batches * local
    reader = tr.ImageReader.from_config(data_cfg)
    if reader_wrapper is not None:
        reader = reader_wrapper(reader, records)
    ds = _EvalElements(records, reader, per_shard,
                       offset=shard_index * per_shard, size=int(data_cfg.image_size))
    ds = ds.batch(local, drop_remainder=False)
    workers = resolve_workers(data_cfg.workers)
    it = _workers(ds.to_iter_dataset(_read_options(data_cfg)), data_cfg, workers)
    it = _Accounting(it, data_cfg.max_unreadable_fraction,
                     min_reads=min(100, max(len(records), 1)),
                     what=f'{dataset_name}/{split}', workers=workers)
    return EvalLoader(it, info, num_batches, local)
