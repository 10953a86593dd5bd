"""The key layouts of CLIP checkpoints and how they map onto our tower.

Hugging Face `vision_model.*` (with or without that prefix) and OpenAI/open_clip `visual.*`
(optionally under a wrapper prefix such as `module.` or `state_dict.`) are recognised from the
keys; the tower's geometry is inferred from the tensors (`infer_config`), and `convert` maps
every tensor of the vision namespace onto a parameter, strictly (see the package docstring).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import re
import warnings
from collections.abc import Callable, Mapping

import numpy as np
from flax import nnx

from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig
from fmsd_jax.model.weights.containers import (
    EXPECTED,
    FLOAT_NAMES,
    CheckpointError,
    PathLike,
    Tensor,
)

# Heads of the released CLIP towers whose head width is not 64 (LAION/open_clip H, g, bigG);
# every other width follows OpenAI CLIP's rule heads = width // 64.
_KNOWN_HEADS = {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}


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

HF_GLOBAL = [
    _Rule("patch_embed", "embeddings.patch_embedding.weight", _conv_to_ours, _conv_from_ours),
    _Rule("class_embedding", "embeddings.class_embedding"),
    _Rule("pos_embedding", "embeddings.position_embedding.weight"),
    *_LN("ln_pre", "pre_layrnorm"),  # sic: Hugging Face's spelling
    *_LN("ln_post", "post_layernorm"),
]
HF_LAYER = [
    *_LN("ln_1", "layer_norm1"),
    *_LIN("attn.q", "self_attn.q_proj"), *_LIN("attn.k", "self_attn.k_proj"),
    *_LIN("attn.v", "self_attn.v_proj"), *_LIN("attn.out", "self_attn.out_proj"),
    *_LN("ln_2", "layer_norm2"),
    *_LIN("mlp.fc1", "mlp.fc1"), *_LIN("mlp.fc2", "mlp.fc2"),
]
HF_PROJ = _Rule("proj", "visual_projection.weight", _T, _T)  # lives outside vision_model.

_OPENAI_GLOBAL = [
    _Rule("patch_embed", "conv1.weight", _conv_to_ours, _conv_from_ours),
    _Rule("class_embedding", "class_embedding"),
    _Rule("pos_embedding", "positional_embedding"),
    *_LN("ln_pre", "ln_pre"),
    *_LN("ln_post", "ln_post"),
]
_OPENAI_LAYER = [  # q, k, v come from the fused in_proj, see convert
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


def find_layout(path: pathlib.Path, keys: list[str]) -> _Layout:
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
    return (f"{path}: {kind}. Expected {EXPECTED}, i.e. keys such as "
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


ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}


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
        if act not in ACTIVATIONS:
            raise CheckpointError(f"{path.parent / 'config.json'}: hidden_act {act!r} is not "
                                  f"supported (expected one of {sorted(ACTIVATIONS)})")
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


def _shape(tensors: Mapping[str, Tensor], key: str, path: pathlib.Path, layout: _Layout,
           ndim: int) -> tuple[int, ...]:
    if key not in tensors:
        raise CheckpointError(
            f"{path}: {layout.label} CLIP vision weights without {key!r}; the file is not a "
            "complete CLIP ViT tower")
    shape = tuple(tensors[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{path}: {key} has shape {list(shape)}; expected {ndim} axes")
    return shape


def infer_config(path: pathlib.Path, tensors: Mapping[str, Tensor], layout: _Layout,
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
    return {flat_key(path): tuple(v.get_value().shape)
            for path, v in nnx.to_flat_state(nnx.state(tower, nnx.Param))}


def flat_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _zeros(shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(np.float32(0), shape)


# --------------------------------------------------------------------------------------------
# conversion


class _Taker:
    """Loads source tensors, checking shape and dtype, and remembers which were used."""

    def __init__(self, tensors: Mapping[str, Tensor]):
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
        if np.dtype(t.dtype).name not in FLOAT_NAMES:
            self.problems.append(f"dtype     {key}  {np.dtype(t.dtype).name}, expected float")
            return None
        return np.asarray(t.numpy(), dtype=np.float32)


def convert(tensors: Mapping[str, Tensor], layout: _Layout,
            cfg: ViTConfig) -> tuple[dict[str, np.ndarray], list[str]]:
    shapes = expected_shapes(cfg)
    take = _Taker(tensors)
    out: dict[str, np.ndarray] = {}
    hf = layout.family == "hf"
    global_rules = HF_GLOBAL if hf else _OPENAI_GLOBAL
    layer_rules = HF_LAYER if hf else _OPENAI_LAYER
    if cfg.proj_dim:
        proj = HF_PROJ if hf else _OPENAI_PROJ
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


def raise_problems(path: PathLike, what: str, problems: list[str], limit: int = 40) -> None:
    if not problems:
        return
    lines = problems[:limit]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    raise CheckpointError(f"{path}: {what}:\n  " + "\n  ".join(lines))
