"""Real CLIP checkpoints in and out of our vision tower.

Reading (`read_clip_vision`, `load_clip_vision`): the container is recognised from the file's
bytes, never its name, because the same weights circulate as `model.safetensors`,
`pytorch_model.bin`, `open_clip_pytorch_model.bin`, `ViT-B-16.pt` and renamed copies:

  * safetensors (Hugging Face `CLIPModel` / `CLIPVisionModel[WithProjection]`, open_clip's
    `open_clip_model.safetensors`), read through a memory map so only the vision tower's
    bytes are touched;
  * PyTorch zip archives (`torch.save` state dicts such as open_clip's `.bin`, and OpenAI's
    TorchScript `.pt`), read by `torch_archive` without torch and without running code;
  * legacy (pre-1.6) PyTorch pickles, only through `torch.load(weights_only=True)`.

The key naming (Hugging Face `vision_model.*`, with or without that prefix, or OpenAI/open_clip
`visual.*`, optionally under a wrapper prefix such as `module.` or `state_dict.`) is recognised
from the keys. The geometry comes from the tensors themselves (width, depth, patch, MLP width,
position table, projection); the head count is the one thing a state dict cannot tell, so it
comes from the `config.json` (Hugging Face) or `open_clip_config.json` beside the file, else
from CLIP's convention (`_default_heads`). The vision namespace is converted strictly: every
source tensor in it is used exactly once and every parameter of the tower is filled, or a
`CheckpointError` lists every offending key with its shape. Everything outside the vision
namespace (the text tower, `logit_scale`, `text_projection`, and buffers such as
`position_ids`, `input_resolution`, `context_length`, `vocab_size`) is ignored on purpose.

Writing (`save_hf_clip_vision`): a Hugging Face directory that `transformers` loads as
`CLIPVisionModel` or, when the tower has a projection, `CLIPVisionModelWithProjection`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import mmap
import os
import pathlib
import re
import struct
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from fmsd_jax import atomic
from fmsd_jax.errors import BadInput
from fmsd_jax.model.torch_archive import TorchArchive, TorchArchiveError, is_torch_zip
from fmsd_jax.model.vit import CLIPVisionTower, LinearFactory, ViTConfig, dense_factory

PathLike = str | os.PathLike

# Looked for, in this order, when `path` is a directory (a Hugging Face or open_clip snapshot).
CHECKPOINT_NAMES = ("model.safetensors", "open_clip_model.safetensors",
                    "open_clip_pytorch_model.bin", "pytorch_model.bin")

_EXPECTED = ("a CLIP ViT checkpoint: a Hugging Face model.safetensors / pytorch_model.bin "
             "(CLIPModel or CLIPVisionModel), an OpenAI CLIP .pt (e.g. ViT-B-16.pt) or an "
             "open_clip open_clip_pytorch_model.bin / open_clip_model.safetensors")

# Heads of the released CLIP towers whose head width is not 64 (LAION/open_clip H, g, bigG);
# every other width follows OpenAI CLIP's rule heads = width // 64.
_KNOWN_HEADS = {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}


class CheckpointError(BadInput):
    """A file that is not, or does not match, a CLIP ViT vision checkpoint (the user's file:
    one line from the CLI; still a ValueError for library callers)."""


class _Tensor(Protocol):
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
_FLOAT_NAMES = {"float16", "float32", "float64", "bfloat16"}


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


def _read_safetensors(path: pathlib.Path) -> dict[str, _Tensor]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    out: dict[str, _Tensor] = {}
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


def _read_legacy_pickle(path: pathlib.Path) -> dict[str, _Tensor]:
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
            f"{_EXPECTED}") from e

    out: dict[str, _Tensor] = {}

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
            f"point at the weight file itself ({_EXPECTED})")
    if not p.is_file():
        raise FileNotFoundError(
            f"CLIP checkpoint {p} does not exist; expected {_EXPECTED}. No weights are "
            "downloaded at run time: fetch them once and give their path (see README)")
    return p


def read_tensors(path: PathLike) -> tuple[str, dict[str, _Tensor]]:
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
            raise CheckpointError(f"{e}; expected {_EXPECTED}") from e
    if _looks_like_safetensors(head, size):
        return "safetensors", _read_safetensors(p)
    if head[:1] == b"\x80":  # a pickle stream: torch.save's pre-1.6 format
        return "legacy-torch", _read_legacy_pickle(p)
    what = "an empty file" if size == 0 else f"a {size}-byte file starting with {head[:8]!r}"
    raise CheckpointError(f"{p} is not a checkpoint ({what}); expected {_EXPECTED}")


# --------------------------------------------------------------------------------------------
# key layouts


def _T(w: np.ndarray) -> np.ndarray:
    return w.T


def _ident(w: np.ndarray) -> np.ndarray:
    return w


def _conv_to_ours(w: np.ndarray) -> np.ndarray:  # (d, 3, p, p) -> (p, p, 3, d)
    return w.transpose(2, 3, 1, 0)


def _conv_from_ours(w: np.ndarray) -> np.ndarray:
    return w.transpose(3, 2, 0, 1)


@dataclasses.dataclass(frozen=True)
class _Rule:
    ours: str  # our key; per-layer rules are relative to "transformer.blocks."
    theirs: str  # their key, relative to the family's vision base / layer prefix
    to_ours: Callable[[np.ndarray], np.ndarray] = _ident
    from_ours: Callable[[np.ndarray], np.ndarray] = _ident


_LN = lambda ours, theirs: [_Rule(f"{ours}.scale", f"{theirs}.weight"),  # noqa: E731
                            _Rule(f"{ours}.bias", f"{theirs}.bias")]
_LIN = lambda ours, theirs: [_Rule(f"{ours}.kernel", f"{theirs}.weight", _T, _T),  # noqa: E731
                             _Rule(f"{ours}.bias", f"{theirs}.bias")]

_HF_GLOBAL = [
    _Rule("patch_embed", "embeddings.patch_embedding.weight", _conv_to_ours, _conv_from_ours),
    _Rule("class_embedding", "embeddings.class_embedding"),
    _Rule("pos_embedding", "embeddings.position_embedding.weight"),
    *_LN("ln_pre", "pre_layrnorm"),  # sic: Hugging Face's spelling
    *_LN("ln_post", "post_layernorm"),
]
_HF_LAYER = [
    *_LN("ln_1", "layer_norm1"),
    *_LIN("attn.q", "self_attn.q_proj"), *_LIN("attn.k", "self_attn.k_proj"),
    *_LIN("attn.v", "self_attn.v_proj"), *_LIN("attn.out", "self_attn.out_proj"),
    *_LN("ln_2", "layer_norm2"),
    *_LIN("mlp.fc1", "mlp.fc1"), *_LIN("mlp.fc2", "mlp.fc2"),
]
_HF_PROJ = _Rule("proj", "visual_projection.weight", _T, _T)  # lives outside vision_model.

_OPENAI_GLOBAL = [
    _Rule("patch_embed", "conv1.weight", _conv_to_ours, _conv_from_ours),
    _Rule("class_embedding", "class_embedding"),
    _Rule("pos_embedding", "positional_embedding"),
    *_LN("ln_pre", "ln_pre"),
    *_LN("ln_post", "ln_post"),
]
_OPENAI_LAYER = [  # q, k, v come from the fused in_proj, see _convert
    *_LN("ln_1", "ln_1"),
    *_LIN("attn.out", "attn.out_proj"),
    *_LN("ln_2", "ln_2"),
    *_LIN("mlp.fc1", "mlp.c_fc"), *_LIN("mlp.fc2", "mlp.c_proj"),
]
_OPENAI_PROJ = _Rule("proj", "proj")


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where one family's vision tower sits inside a file's key space."""

    family: str  # "hf" or "openai"
    prefix: str  # wrapper prefix in front of everything ("", "module.", "backbone.", ...)
    base: str  # prefix of the vision tower's own keys
    layer: str  # per-layer prefix, with {i}
    ignored: tuple[str, ...]  # keys inside the vision namespace that are buffers, not weights

    @property
    def label(self) -> str:
        return "Hugging Face" if self.family == "hf" else "OpenAI/open_clip"

    @property
    def proj_key(self) -> str:
        return self.prefix + ("visual_projection.weight" if self.family == "hf" else
                              "visual.proj")

    def in_namespace(self, key: str) -> bool:
        if key == self.proj_key:
            return True
        if self.base != self.prefix:
            return key.startswith(self.base)
        # transformers >= 5 saves CLIPVisionModel without the `vision_model.` level
        return key.startswith(tuple(self.prefix + s for s in
                                    ("embeddings.", "pre_layrnorm.", "encoder.",
                                     "post_layernorm.")))


_ANCHORS = (
    ("vision_model.embeddings.patch_embedding.weight", "hf", "vision_model."),
    ("visual.conv1.weight", "openai", "visual."),
)
_BARE_HF_ANCHOR = "embeddings.patch_embedding.weight"


# Towers that share CLIP's key names in part (a ResNet CLIP has `visual.conv1.weight` too) but
# are other architectures: recognised first, so the error names what the file is.
_FOREIGN = ("visual.layer1.", "visual.attnpool.", "visual.trunk.")


def _find_layout(path: pathlib.Path, keys: list[str]) -> _Layout:
    if any(f in k for k in keys for f in _FOREIGN):
        raise CheckpointError(_diagnose_foreign(path, keys))
    found: list[tuple[str, str, str]] = []
    for anchor, family, level in _ANCHORS:
        for k in keys:
            if k == anchor or k.endswith("." + anchor):
                found.append((family, k[: -len(anchor)], level))
    if not found:
        for k in keys:
            if k == _BARE_HF_ANCHOR or k.endswith("." + _BARE_HF_ANCHOR):
                found.append(("hf", k[: -len(_BARE_HF_ANCHOR)], ""))
    if len(found) > 1:
        raise CheckpointError(
            f"{path}: holds {len(found)} CLIP vision towers (key prefixes "
            f"{sorted(p + lvl for _, p, lvl in found)}); extract the one you want into its own "
            "file")
    if not found:
        raise CheckpointError(_diagnose_foreign(path, keys))
    family, prefix, level = found[0]
    base = prefix + level
    if family == "hf":
        return _Layout("hf", prefix, base, base + "encoder.layers.{i}.",
                       (base + "embeddings.position_ids",))
    # OpenAI's modules may carry their input size / output width as scalar buffers
    return _Layout("openai", prefix, base, base + "transformer.resblocks.{i}.",
                   (base + "input_resolution", base + "output_dim"))


def _diagnose_foreign(path: pathlib.Path, keys: list[str]) -> str:
    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if has("visual.layer1.") or has("visual.attnpool."):
        kind = ("a ResNet CLIP (OpenAI ModifiedResNet: visual.layer1..., visual.attnpool); "
                "only ViT towers are supported")
    elif has("visual.trunk."):
        kind = "an open_clip tower built on a timm model (visual.trunk.*); only CLIP ViTs " \
               "are supported"
    elif has("vision_model."):
        kind = "a Hugging Face vision model without CLIP's patch embedding (another " \
               "architecture)"
    elif not keys:
        kind = "a checkpoint without tensors"
    else:
        kind = "not a CLIP vision checkpoint"
    sample = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
    return (f"{path}: {kind}. Expected {_EXPECTED}, i.e. keys such as "
            f"'vision_model.embeddings.patch_embedding.weight' or 'visual.conv1.weight'; found "
            f"{len(keys)} tensors ({sample})")


# --------------------------------------------------------------------------------------------
# geometry


def _side_config(path: pathlib.Path, name: str) -> dict | None:
    f = path.parent / name
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: unreadable JSON beside checkpoint {path} ({e})") from e


def _default_heads(width: int) -> int:
    if width in _KNOWN_HEADS:
        return _KNOWN_HEADS[width]
    if width % 64:
        raise CheckpointError(
            f"cannot infer the number of attention heads of a width-{width} tower (CLIP uses "
            "head width 64); pass heads=")
    return width // 64


_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}


def _numerics_from_configs(path: pathlib.Path, layout: _Layout, container: str, width: int,
                           layers: int, patch: int) -> tuple[int | None, str | None, float]:
    """(heads, activation, layer-norm eps) as the files beside the checkpoint state them."""
    if layout.family == "hf" and (hf := _side_config(path, "config.json")) is not None:
        model_type = hf.get("model_type")
        if model_type not in (None, "clip", "clip_vision_model"):
            raise CheckpointError(
                f"{path.parent / 'config.json'} says model_type {model_type!r}; expected a CLIP "
                "model ('clip' or 'clip_vision_model')")
        vc = hf.get("vision_config", {}) if model_type == "clip" else hf
        for field, got in (("hidden_size", width), ("num_hidden_layers", layers),
                           ("patch_size", patch)):
            if field in vc and vc[field] != got:
                raise CheckpointError(
                    f"{path.parent / 'config.json'} gives {field}={vc[field]} but the weights in "
                    f"{path} have {got}; the config belongs to another model")
        act = vc.get("hidden_act", "quick_gelu")
        if act not in _ACTIVATIONS:
            raise CheckpointError(f"{path.parent / 'config.json'}: hidden_act {act!r} is not "
                                  f"supported (expected one of {sorted(_ACTIVATIONS)})")
        return vc.get("num_attention_heads"), act, float(vc.get("layer_norm_eps", 1e-5))
    if layout.family == "openai" and (oc := _side_config(path, "open_clip_config.json")):
        mc = oc.get("model_cfg", oc)
        vc = mc.get("vision_cfg", {})
        unsupported = {k: vc[k] for k in ("timm_model_name", "ls_init_value", "attentional_pool",
                                          "global_average_pool", "no_ln_pre")
                       if vc.get(k)}
        if vc.get("pool_type", "tok") != "tok":
            unsupported["pool_type"] = vc["pool_type"]
        if vc.get("pos_embed_type", "learnable") != "learnable":
            unsupported["pos_embed_type"] = vc["pos_embed_type"]
        if unsupported:
            raise CheckpointError(
                f"{path.parent / 'open_clip_config.json'}: vision_cfg {unsupported} describes a "
                "tower that is not a plain CLIP ViT; only CLIP ViTs are supported")
        head_width = int(vc.get("head_width", 64))
        if width % head_width:
            raise CheckpointError(f"{path.parent / 'open_clip_config.json'}: head_width "
                                  f"{head_width} does not divide the tower's width {width}")
        return width // head_width, "quick_gelu" if mc.get("quick_gelu") else "gelu", 1e-5
    if container == "torchscript":  # OpenAI's own release: CLIP's conventions hold
        return None, "quick_gelu", 1e-5
    return None, None, 1e-5


def _shape(tensors: Mapping[str, _Tensor], key: str, path: pathlib.Path, layout: _Layout,
           ndim: int) -> tuple[int, ...]:
    if key not in tensors:
        raise CheckpointError(
            f"{path}: {layout.label} CLIP vision weights without {key!r}; the file is not a "
            "complete CLIP ViT tower")
    shape = tuple(tensors[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{path}: {key} has shape {list(shape)}; expected {ndim} axes")
    return shape


def _infer_config(path: pathlib.Path, tensors: Mapping[str, _Tensor], layout: _Layout,
                  container: str, heads: int | None, activation: str | None) -> ViTConfig:
    hf = layout.family == "hf"
    b = layout.base
    d, c, p, p2 = _shape(tensors, b + ("embeddings.patch_embedding.weight" if hf else
                                       "conv1.weight"), path, layout, 4)
    if c != 3 or p != p2:
        raise CheckpointError(f"{path}: patch embedding of shape {(d, c, p, p2)}; expected "
                              "(width, 3, patch, patch) of an RGB CLIP ViT")
    (t, d2) = _shape(tensors, b + ("embeddings.position_embedding.weight" if hf else
                                   "positional_embedding"), path, layout, 2)
    grid = math.isqrt(max(t - 1, 0))
    if grid * grid + 1 != t or d2 != d:
        raise CheckpointError(f"{path}: position table of shape {(t, d2)}; expected "
                              f"(grid*grid + 1, {d}) for a square image plus the class token")
    head = re.escape(layout.layer.split("{i}")[0])
    idx = {int(m.group(1)) for k in tensors if (m := re.match(head + r"(\d+)\.", k))}
    if not idx:
        raise CheckpointError(f"{path}: {layout.label} CLIP vision weights without any "
                              f"transformer block ({layout.layer.format(i=0)}*)")
    layers = max(idx) + 1
    fc1 = layout.layer.format(i=0) + ("mlp.fc1.weight" if hf else "mlp.c_fc.weight")
    mlp_dim = _shape(tensors, fc1, path, layout, 2)[0]
    proj_dim = None
    if layout.proj_key in tensors:
        ps = tuple(tensors[layout.proj_key].shape)
        proj_dim = ps[0] if hf else ps[-1]

    cfg_heads, cfg_act, eps = _numerics_from_configs(path, layout, container, d, layers, p)
    guessed_heads = heads is None and cfg_heads is None and container != "torchscript"
    if guessed_heads or (activation is None and cfg_act is None):
        guess = _KNOWN_HEADS.get(d, d // 64)
        warnings.warn(
            f"{path}: no config.json / open_clip_config.json beside the checkpoint; assuming "
            f"CLIP's conventions (quick_gelu, {guess} heads for width {d}). Pass heads= and "
            "activation= ('gelu' for LAION/DataComp open_clip weights) if they do not hold",
            stacklevel=3)
    heads = heads or cfg_heads or _default_heads(d)
    activation = activation or cfg_act or "quick_gelu"
    if d % heads:
        raise CheckpointError(f"{path}: {heads} heads do not divide the width {d}")
    return ViTConfig(width=d, layers=layers, heads=int(heads), patch_size=p, mlp_dim=mlp_dim,
                     proj_dim=proj_dim, image_size=grid * p, layer_norm_eps=eps,
                     activation=activation)


@functools.lru_cache(maxsize=16)
def expected_shapes(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Our flat parameter keys and shapes for `cfg`, taken from the module itself."""
    tower = nnx.eval_shape(lambda: CLIPVisionTower(cfg, rngs=nnx.Rngs(0)))
    return {_key(path): tuple(v.get_value().shape)
            for path, v in nnx.to_flat_state(nnx.state(tower, nnx.Param))}


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _zeros(shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(np.float32(0), shape)


# --------------------------------------------------------------------------------------------
# conversion


class _Taker:
    """Loads source tensors, checking shape and dtype, and remembers which were used."""

    def __init__(self, tensors: Mapping[str, _Tensor]):
        self.tensors = tensors
        self.used: set[str] = set()
        self.problems: list[str] = []

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        t = self.tensors.get(key)
        if t is None:
            self.problems.append(f"missing   {key}  (expected {list(shape)})")
            return None
        self.used.add(key)
        if tuple(t.shape) != tuple(shape):
            self.problems.append(f"shape     {key}  {list(t.shape)}, expected {list(shape)}")
            return None
        if np.dtype(t.dtype).name not in _FLOAT_NAMES:
            self.problems.append(f"dtype     {key}  {np.dtype(t.dtype).name}, expected float")
            return None
        return np.asarray(t.numpy(), dtype=np.float32)


def _convert(tensors: Mapping[str, _Tensor], layout: _Layout,
             cfg: ViTConfig) -> tuple[dict[str, np.ndarray], list[str]]:
    shapes = expected_shapes(cfg)
    take = _Taker(tensors)
    out: dict[str, np.ndarray] = {}
    hf = layout.family == "hf"
    global_rules = _HF_GLOBAL if hf else _OPENAI_GLOBAL
    layer_rules = _HF_LAYER if hf else _OPENAI_LAYER
    if cfg.proj_dim:
        proj = _HF_PROJ if hf else _OPENAI_PROJ
        w = take.take(layout.proj_key, proj.from_ours(_zeros(shapes["proj"])).shape)
        if w is not None:
            out["proj"] = proj.to_ours(w)
    for r in global_rules:
        w = take.take(layout.base + r.theirs, r.from_ours(_zeros(shapes[r.ours])).shape)
        if w is not None:
            out[r.ours] = r.to_ours(w)

    stacked: dict[str, list[np.ndarray | None]] = {}
    for i in range(cfg.layers):
        lp = layout.layer.format(i=i)
        for r in layer_rules:
            ours = "transformer.blocks." + r.ours
            w = take.take(lp + r.theirs, r.from_ours(_zeros(shapes[ours][1:])).shape)
            stacked.setdefault(ours, []).append(None if w is None else r.to_ours(w))
        if not hf:  # OpenAI's nn.MultiheadAttention fuses q, k, v along the output axis
            d = cfg.width
            w = take.take(lp + "attn.in_proj_weight", (3 * d, d))
            b = take.take(lp + "attn.in_proj_bias", (3 * d,))
            for j, n in enumerate("qkv"):
                stacked.setdefault(f"transformer.blocks.attn.{n}.kernel", []).append(
                    None if w is None else w[j * d:(j + 1) * d].T)
                stacked.setdefault(f"transformer.blocks.attn.{n}.bias", []).append(
                    None if b is None else b[j * d:(j + 1) * d])
    for ours, ws in stacked.items():
        if all(w is not None for w in ws):
            out[ours] = np.stack(ws)

    ignored = set(layout.ignored)
    for k in sorted(tensors):
        if layout.in_namespace(k) and k not in take.used and k not in ignored:
            take.problems.append(f"unused    {k}  {list(tensors[k].shape)}")
    return out, take.problems


def _raise_problems(path: PathLike, what: str, problems: list[str], limit: int = 40) -> None:
    if not problems:
        return
    lines = problems[:limit]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    raise CheckpointError(f"{path}: {what}:\n  " + "\n  ".join(lines))


# --------------------------------------------------------------------------------------------
# position embeddings


def _cubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of torch's bicubic upsampling (A = -0.75, align_corners=False,
    no antialias), as `F.interpolate` and hence Hugging Face and open_clip use it."""
    a = -0.75
    scale = in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        src = scale * (o + 0.5) - 0.5  # not clamped at 0 for cubic, unlike linear
        i0 = math.floor(src)
        t = src - i0
        w = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
             ((a + 2) * t - (a + 3)) * t * t + 1,
             ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
             ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a)
        for k in range(4):
            m[o, min(max(i0 - 1 + k, 0), in_size - 1)] += w[k]
    return m


def resample_pos_embedding(pos: np.ndarray, grid: int) -> np.ndarray:
    """The (1 + g*g, d) position table resampled to a grid x grid patch grid.

    The class token's row is kept; the patch rows are resized bicubically exactly as Hugging
    Face's `interpolate_pos_encoding` (and open_clip's `resize_pos_embed`) do, computed in
    float64, so the result matches theirs to float32 rounding (~1e-7 relative).
    """
    old = math.isqrt(pos.shape[0] - 1)
    if old * old + 1 != pos.shape[0]:
        raise ValueError(f"position table of {pos.shape[0]} rows is not 1 + a square grid")
    if old == grid:
        return pos
    w = _cubic_weights(old, grid)
    patches = pos[1:].astype(np.float64).reshape(old, old, -1)
    patches = np.einsum("ih,jw,hwd->ijd", w, w, patches).reshape(grid * grid, -1)
    return np.concatenate([pos[:1], patches.astype(pos.dtype)], axis=0)


# --------------------------------------------------------------------------------------------
# public API


def read_clip_vision(path: PathLike, image_size: int | None = None, *, heads: int | None = None,
                     activation: str | None = None) -> tuple[ViTConfig, dict[str, np.ndarray]]:
    """(config, float32 weights in our flat layout) of the CLIP vision tower in `path`.

    `image_size` other than the checkpoint's resamples the position table (see
    `resample_pos_embedding`). `heads` and `activation` override what the files beside the
    checkpoint say; only a bare state dict of a non-standard tower needs them. Keys of the
    returned dict are our nnx state paths joined by dots ("transformer.blocks.attn.q.kernel"),
    ready for `assign_weights` into an existing tower or detector backbone.
    """
    p = resolve_checkpoint(path)
    if activation is not None and activation not in _ACTIVATIONS:
        raise ValueError(f"activation {activation!r}; expected one of {sorted(_ACTIVATIONS)}")
    container, tensors = read_tensors(p)
    layout = _find_layout(p, list(tensors))
    cfg = _infer_config(p, tensors, layout, container, heads, activation)
    weights, problems = _convert(tensors, layout, cfg)
    _raise_problems(p, f"the {layout.label} CLIP vision weights ({container}) do not match a "
                       f"ViT with width {cfg.width}, {cfg.layers} layers, patch "
                       f"{cfg.patch_size}, MLP {cfg.mlp_dim}, projection {cfg.proj_dim}",
                    problems)
    if image_size is not None and image_size != cfg.image_size:
        if image_size <= 0 or image_size % cfg.patch_size:
            raise ValueError(
                f"image_size {image_size} is not a positive multiple of the patch size "
                f"{cfg.patch_size} of {p}; choose a size whose side divides by the patch")
        weights["pos_embedding"] = resample_pos_embedding(weights["pos_embedding"],
                                                          image_size // cfg.patch_size)
        cfg = dataclasses.replace(cfg, image_size=image_size)
    return cfg, weights


def assign_weights(tower: nnx.Module, weights: Mapping[str, np.ndarray], *,
                   source: PathLike = "weights") -> None:
    """Put `weights` (our flat layout) into every `nnx.Param` of `tower`, strictly.

    Every parameter must be filled and every weight used, with equal shapes; otherwise the
    error lists each offending key. A parameter that already lives on devices keeps its
    sharding (the trainer loads into a sharded model); dtypes stay the tower's (float32).
    """
    flat = nnx.to_flat_state(nnx.state(tower, nnx.Param))
    targets = {_key(path): var for path, var in flat}
    problems = [f"missing   {k}  (expected {list(targets[k].get_value().shape)})"
                for k in targets if k not in weights]
    problems += [f"unused    {k}  {list(np.shape(weights[k]))}"
                 for k in weights if k not in targets]
    new = {}
    for path, var in flat:
        k = _key(path)
        if k not in weights:
            continue
        cur = var.get_value()
        w = np.asarray(weights[k])
        if tuple(w.shape) != tuple(cur.shape):
            problems.append(f"shape     {k}  {list(w.shape)}, expected {list(cur.shape)}")
            continue
        w = w.astype(cur.dtype, copy=False)
        sharding = getattr(cur, "sharding", None)
        new[path] = jax.device_put(w, sharding) if isinstance(cur, jax.Array) else jnp.asarray(w)
    _raise_problems(source, "weights do not fit the tower's parameters", problems)
    nnx.update(tower, nnx.from_flat_state(new))


def load_clip_vision(path: PathLike, *, image_size: int | None = None,
                     dtype: str = "float32", attention_impl: str | None = None,
                     remat: str = "dots", linear_factory: LinearFactory = dense_factory,
                     rngs: nnx.Rngs | None = None, heads: int | None = None,
                     activation: str | None = None) -> CLIPVisionTower:
    """The CLIP vision tower in `path` with its weights in place.

    `dtype` is the compute dtype (parameters stay float32). Without `rngs` the tower is built
    abstractly and every parameter comes from the checkpoint, so no random initialisation is
    paid for; a `linear_factory` whose layers own parameters that no checkpoint holds needs
    `rngs` to initialise them, and its layers must still expose `kernel`/`bias` to be filled
    (decompose after loading otherwise).
    """
    cfg, weights = read_clip_vision(path, image_size, heads=heads, activation=activation)
    cfg = dataclasses.replace(cfg, dtype=dtype, attention_impl=attention_impl, remat=remat)

    def build(r: nnx.Rngs) -> CLIPVisionTower:
        return CLIPVisionTower(cfg, rngs=r, linear_factory=linear_factory)

    tower = nnx.eval_shape(lambda: build(nnx.Rngs(0))) if rngs is None else build(rngs)
    assign_weights(tower, weights, source=resolve_checkpoint(path))
    abstract = [_key(p) for p, v in nnx.to_flat_state(nnx.state(tower))
                if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    if abstract:
        raise CheckpointError(
            f"{path}: the tower's linear_factory creates state the checkpoint does not hold "
            f"({abstract[:5]}); pass rngs= to initialise it")
    return tower


def tower_weights(tower: CLIPVisionTower) -> dict[str, np.ndarray]:
    """The tower's parameters as float32 numpy arrays in our flat layout."""
    return {_key(path): np.asarray(jax.device_get(var.get_value()), dtype=np.float32)
            for path, var in nnx.to_flat_state(nnx.state(tower, nnx.Param))}


def to_hf_state_dict(cfg: ViTConfig, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our layout -> Hugging Face keys (`vision_model.*`, `visual_projection.weight`)."""
    shapes = expected_shapes(dataclasses.replace(cfg, dtype="float32", attention_impl=None))
    problems = [f"missing   {k}  (expected {list(s)})" for k, s in shapes.items()
                if k not in weights]
    problems += [f"unused    {k}  {list(np.shape(w))}" for k, w in weights.items()
                 if k not in shapes]
    _raise_problems("tower", "not a plain dense CLIP tower (merge decomposed layers into dense "
                             "weights before exporting)", problems)
    out: dict[str, np.ndarray] = {}
    for r in _HF_GLOBAL:
        out["vision_model." + r.theirs] = r.from_ours(weights[r.ours])
    for r in _HF_LAYER:
        w = weights["transformer.blocks." + r.ours]
        for i in range(cfg.layers):
            out[f"vision_model.encoder.layers.{i}.{r.theirs}"] = r.from_ours(w[i])
    if cfg.proj_dim:
        out[_HF_PROJ.theirs] = _HF_PROJ.from_ours(weights["proj"])
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def hf_vision_config(cfg: ViTConfig) -> dict[str, Any]:
    """A transformers `CLIPVisionConfig` dict describing `cfg`."""
    return {
        "architectures": ["CLIPVisionModelWithProjection" if cfg.proj_dim else
                          "CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "patch_size": cfg.patch_size,
        "image_size": cfg.image_size,
        "num_channels": 3,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
        # transformers requires an int; 512 is its default and unused without a projection
        "projection_dim": cfg.proj_dim or 512,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "dtype": "float32",
    }


def save_hf_clip_vision(tower: CLIPVisionTower, out_dir: PathLike) -> pathlib.Path:
    """Write `tower` as a Hugging Face checkpoint directory (config.json + model.safetensors).

    Keys are the long-standing hub layout (`vision_model.*`), which every transformers version
    reads. A tower with a projection also gets `visual_projection.weight` and the architecture
    `CLIPVisionModelWithProjection`, which loads everything; `CLIPVisionModel.from_pretrained`
    loads the same directory and reports the projection as an unused key. Files are written
    to temporary names and renamed, so a crash never leaves a half-written checkpoint.
    Returns the directory.
    """
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tower.cfg
    tensors = to_hf_state_dict(cfg, tower_weights(tower))
    # Weights first, config last: a directory with config.json holds complete weights.
    with atomic.replacing(out / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic.write_json(out / "config.json", hf_vision_config(cfg), sort_keys=False)
    return out
