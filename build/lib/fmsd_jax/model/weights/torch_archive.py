"""Read tensors out of PyTorch zip archives without torch and without executing their code.

Both `torch.save` (since torch 1.6) and `torch.jit.save` write a zip whose `<name>/data.pkl`
pickles the object tree and whose `<name>/data/<key>` entries hold the raw storages. OpenAI
ships CLIP as such a TorchScript archive and open_clip ships `torch.save` state dicts, so one
reader serves both. A plain `pickle.load` would run whatever callables the file names
(DESIGN.md §4: no pickle from untrusted files), so the unpickler below resolves only an
allow-list of reconstruction functions, maps every other `torch`/`collections` global to an
error, and turns TorchScript's `__torch__.*` module classes into inert attribute holders.

Tensors come back lazily: nothing is read from the archive until `.numpy()` is called, so
taking the vision tower out of a 1.7 GB CLIP file never touches the text tower's bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import zipfile
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np

ZIP_MAGIC = b"PK\x03\x04"

# Legacy typed-storage classes name the element type of the storage.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),  # the element type arrives with _rebuild_tensor_v3
}
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}


class TorchArchiveError(ValueError):
    """The archive is not a tensor checkpoint this reader can open safely."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Dtype:
    dtype: np.dtype


class _Storage:
    """One `data/<key>` entry, read on first use."""

    def __init__(self, archive: TorchArchive, key: str, dtype: np.dtype):
        self.archive, self.key, self.dtype = archive, key, dtype
        self._buf: bytes | None = None

    def buffer(self) -> bytes:
        if self._buf is None:
            self._buf = self.archive.read_storage(self.key)
        return self._buf


@dataclasses.dataclass
class LazyTensor:
    """A strided view into a storage; `numpy()` materialises a contiguous copy."""

    storage: _Storage
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype

    def numpy(self) -> np.ndarray:
        dt = self.dtype.newbyteorder(">") if self.storage.archive.big_endian else self.dtype
        flat = np.frombuffer(self.storage.buffer(), dtype=dt)
        if not self.shape:
            return flat[self.offset : self.offset + 1].reshape(()).astype(self.dtype)
        needed = self.offset + 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride,
                                                                   strict=True))
        if min(self.shape) > 0 and needed > flat.size:
            raise TorchArchiveError(
                f"{self.storage.archive.path}: tensor in storage {self.storage.key!r} reaches "
                f"element {needed} but the storage holds {flat.size}; the archive is truncated")
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.shape,
            strides=tuple(s * dt.itemsize for s in self.stride), writeable=False)
        return np.ascontiguousarray(view).astype(self.dtype, copy=False)


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    return LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride), storage.dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype,
                       *_unused):
    del requires_grad, hooks
    return LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride), dtype.dtype)


def _rebuild_parameter(data, *_unused):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    del new_type, state  # a tensor subclass: keep the plain tensor
    return func(*args)


def _passthrough(value, *_unused):
    return value


class TorchScriptObject:
    """Stands in for a `__torch__.*` class: keeps the pickled attributes, runs no code."""

    _qualname = "__torch__"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["__state__"] = state

    def __repr__(self) -> str:
        return f"<{self._qualname}>"


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): tuple,
    ("torch", "device"): str,
    ("torch.jit._pickle", "restore_type_tag"): _passthrough,
    ("torch.jit._pickle", "build_intlist"): _passthrough,
    ("torch.jit._pickle", "build_doublelist"): _passthrough,
    ("torch.jit._pickle", "build_boollist"): _passthrough,
    ("torch.jit._pickle", "build_tensorlist"): _passthrough,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: TorchArchive):
        super().__init__(file)
        self.archive = archive
        self._storages: dict[str, _Storage] = {}
        self._script_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch.storage" and name == "UntypedStorage":
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _Dtype(_TORCH_DTYPES[name])
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._script_classes:
                self._script_classes[qualname] = type(
                    name, (TorchScriptObject,), {"_qualname": qualname})
            return self._script_classes[qualname]
        raise TorchArchiveError(
            f"{self.archive.path}: refusing to unpickle {module}.{name}; only tensors, dicts "
            "and TorchScript modules are read from a checkpoint (nothing in it is executed). "
            "If you trust the file, re-save its state dict with torch.save(model.state_dict())")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise TorchArchiveError(f"{self.archive.path}: unknown persistent id {pid!r}")
        _, storage_type, key, _location, _numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise TorchArchiveError(f"{self.archive.path}: unknown storage type {storage_type!r}")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = _Storage(self.archive, key, storage_type.dtype)
        return self._storages[key]


class TorchArchive:
    """A torch zip archive (`torch.save` or TorchScript); `tensors()` flattens its tree."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise TorchArchiveError(f"{path}: not a readable zip archive ({e})") from e
        names = self._zip.namelist()
        pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise TorchArchiveError(
                f"{path}: a zip file, but not a PyTorch archive (expected exactly one "
                f"'<name>/data.pkl', found {pkls or 'none'})")
        self.prefix = pkls[0][: -len("data.pkl")]
        self.is_torchscript = any(n.startswith(self.prefix + "code/") for n in names)
        order = self.prefix + "byteorder"
        self.big_endian = order in names and self._zip.read(order).strip() == b"big"

    def read_storage(self, key: str) -> bytes:
        try:
            return self._zip.read(f"{self.prefix}data/{key}")
        except KeyError as e:
            raise TorchArchiveError(f"{self.path}: storage data/{key} missing from archive") \
                from e

    def load(self) -> Any:
        """The unpickled object tree, with `LazyTensor` leaves."""
        with self._zip.open(self.prefix + "data.pkl") as f:
            try:
                return _RestrictedUnpickler(f, self).load()
            except TorchArchiveError:
                raise
            except Exception as e:  # malformed pickle stream
                raise TorchArchiveError(f"{self.path}: cannot read data.pkl ({e})") from e

    def tensors(self) -> dict[str, LazyTensor]:
        """Every tensor in the tree under its dotted path (a state dict's keys stay as they are;
        a TorchScript module's attributes become `visual.conv1.weight` etc.)."""
        return dict(_walk(self.load(), ""))

    def close(self) -> None:
        self._zip.close()


def _walk(obj: Any, prefix: str, seen: set[int] | None = None) -> Iterator[tuple[str, Any]]:
    seen = set() if seen is None else seen
    if isinstance(obj, LazyTensor):
        yield prefix.rstrip("."), obj
        return
    if id(obj) in seen:
        return
    if isinstance(obj, dict):
        seen.add(id(obj))
        for k, v in obj.items():
            yield from _walk(v, f"{prefix}{k}.", seen)
    elif isinstance(obj, (list, tuple)):
        seen.add(id(obj))
        for i, v in enumerate(obj):
            yield from _walk(v, f"{prefix}{i}.", seen)
    elif isinstance(obj, TorchScriptObject):
        seen.add(id(obj))
        for k, v in vars(obj).items():
            yield from _walk(v, f"{prefix}{k}.", seen)


def is_torch_zip(head: bytes) -> bool:
    return head.startswith(ZIP_MAGIC)
