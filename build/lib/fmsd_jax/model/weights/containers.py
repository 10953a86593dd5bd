"""CLIP weight files as tensors: safetensors (memory-mapped), PyTorch zip archives and
legacy pickles, read without torch. Which file a path names (`resolve_checkpoint`) and the
raw tensors it holds (`read_tensors`); what the keys mean is `layouts`' job."""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import pathlib
import struct
from collections.abc import Mapping
from typing import Any, Protocol

import ml_dtypes
import numpy as np

from fmsd_jax.errors import BadInput
from fmsd_jax.model.weights.torch_archive import TorchArchive, TorchArchiveError, is_torch_zip

PathLike = str | os.PathLike

# Looked for, in this order, when `path` is a directory (a Hugging Face or open_clip snapshot).
CHECKPOINT_NAMES = ("model.safetensors", "open_clip_model.safetensors",
                    "open_clip_pytorch_model.bin", "pytorch_model.bin")

EXPECTED = ("a CLIP ViT checkpoint: a Hugging Face model.safetensors / pytorch_model.bin "
            "(CLIPModel or CLIPVisionModel), an OpenAI CLIP .pt (e.g. ViT-B-16.pt) or an "
            "open_clip open_clip_pytorch_model.bin / open_clip_model.safetensors")


class CheckpointError(BadInput):
    """A file that is not, or does not match, a CLIP ViT vision checkpoint (the user's file:
    one line from the CLI; still a ValueError for library callers)."""


class Tensor(Protocol):
    shape: tuple[int, ...]
    dtype: np.dtype

    def numpy(self) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------
# containers


_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
FLOAT_NAMES = {"float16", "float32", "float64", "bfloat16"}


@dataclasses.dataclass
class _MappedTensor:
    buf: mmap.mmap
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def numpy(self) -> np.ndarray:
        count = math.prod(self.shape)
        return np.frombuffer(self.buf, self.dtype, count, self.offset).reshape(self.shape).copy()


@dataclasses.dataclass
class _ArrayTensor:
    array: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def numpy(self) -> np.ndarray:
        return self.array


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def _read_safetensors(path: pathlib.Path) -> dict[str, Tensor]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    out: dict[str, Tensor] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors entry {key!r}: {info!r}") from e
        begin = 8 + n + start
        if end - start != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
            raise CheckpointError(
                f"{path}: safetensors entry {key!r} ({info['dtype']}, {list(shape)}) does not "
                f"fit its byte range {start}..{end} in a {size}-byte file; the file is truncated "
                "or corrupt")
        out[key] = _MappedTensor(buf, begin, shape, dtype)
    return out


def _read_legacy_pickle(path: pathlib.Path) -> dict[str, Tensor]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path}: a legacy (non-zip) PyTorch pickle; reading it needs torch "
            "(pip install torch), or re-save it once with torch.save(state_dict, path), which "
            "writes the zip format this loader reads without torch") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) refused the file ({e}); expected "
            f"{EXPECTED}") from e

    out: dict[str, Tensor] = {}

    def walk(o: Any, prefix: str) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu()
            out[prefix.rstrip(".")] = _ArrayTensor(
                t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy())
        elif isinstance(o, Mapping):
            for k, v in o.items():
                walk(v, f"{prefix}{k}.")

    walk(obj, "")
    return out


def resolve_checkpoint(path: PathLike) -> pathlib.Path:
    """The checkpoint file `path` names (a directory stands for the checkpoint inside it)."""
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        for name in CHECKPOINT_NAMES:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(
            f"CLIP checkpoint directory {p} holds none of {', '.join(CHECKPOINT_NAMES)}; "
            f"point at the weight file itself ({EXPECTED})")
    if not p.is_file():
        raise FileNotFoundError(
            f"CLIP checkpoint {p} does not exist; expected {EXPECTED}. No weights are "
            "downloaded at run time: fetch them once and give their path (see README)")
    return p


def read_tensors(path: PathLike) -> tuple[str, dict[str, Tensor]]:
    """(container, lazily loaded tensors by key) of any supported checkpoint file."""
    p = resolve_checkpoint(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(16)
    if is_torch_zip(head):
        try:
            archive = TorchArchive(str(p))
            return ("torchscript" if archive.is_torchscript else "torch"), archive.tensors()
        except TorchArchiveError as e:
            raise CheckpointError(f"{e}; expected {EXPECTED}") from e
    if _looks_like_safetensors(head, size):
        return "safetensors", _read_safetensors(p)
    if head[:1] == b"\x80":  # a pickle stream: torch.save's pre-1.6 format
        return "legacy-torch", _read_legacy_pickle(p)
    what = "an empty file" if size == 0 else f"a {size}-byte file starting with {head[:8]!r}"
    raise CheckpointError(f"{p} is not a checkpoint ({what}); expected {EXPECTED}")
