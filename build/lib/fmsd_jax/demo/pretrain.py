"""Self-supervised pretraining of a small CLIP-shaped ViT on real photographs (SimCLR).

Why: FMSD's premise is a pretrained backbone whose large singular directions hold general
semantics worth preserving while the small ones adapt to forgery artifacts. No CLIP weights can
be downloaded where the demo runs, and a randomly initialised tower has no such structure, so
the demo first makes its own pretrained tower from the real photographs of the synthetic
benchmark, then loads it exactly as a real CLIP checkpoint is loaded (`load_clip_vision`).

Why SimCLR (NT-Xent between two augmented views, an MLP projection head that is thrown away):
on two CPU cores it gives useful features in a couple of minutes, needs no labels and no
momentum encoder, and its invariances (crop, flip, colour, blur) are those of CLIP-like
features. Masked-patch reconstruction needs far more steps to produce linearly useful
features, and DINO's teacher/centering adds moving parts for no gain at this scale.

Only real photographs of the benchmark's *train* split are used (the same photo assignment
`synthetic.write_benchmark` makes), never a fake frame and never a validation or test photo,
so the backbone knows nothing about any forgery family.

Quality is measured, not assumed: `identity_knn_accuracy` is the leave-one-out 1-NN accuracy
of telling which *unseen* photograph (val + test photos) a random crop comes from, for the
pretrained tower and for the same tower at initialisation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fmsd_jax import atomic
from fmsd_jax.data.config import CLIP_MEAN, CLIP_STD
from fmsd_jax.model.vit import CLIPVisionTower, ViTConfig
from fmsd_jax.model.weights.export_hf import save_hf_clip_vision
from fmsd_jax.model.weights.load import load_clip_vision

log = logging.getLogger("fmsd_jax")

RECORD_JSON = "pretrain.json"
WEIGHTS = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Tower geometry and SimCLR settings (defaults: the demo's backbone)."""

    width: int = 64
    layers: int = 4
    heads: int = 4
    patch_size: int = 8
    mlp_dim: int = 256
    image_size: int = 64
    steps: int = 300
    batch_size: int = 64  # images per step; each gives two views
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    temperature: float = 0.2
    proj_hidden: int = 256
    proj_dim: int = 64
    # Crop side as a fraction of the photo's short side. The benchmark's frames are crops of
    # 0.35-0.8 of the short side, so views span that range and beyond.
    crop_scale: tuple[float, float] = (0.2, 0.9)
    # No blur by default: blur invariance erases exactly the high-frequency traces that
    # blending and resampling leave (measured: with blur p=0.5 every row's SynBlend validation
    # AUC stayed at ~0.52). CLIP itself trained with crops only.
    blur_prob: float = 0.0
    gray_prob: float = 0.2
    jitter: float = 0.4  # brightness / contrast / saturation strength
    log_every: int = 50
    knn_crops: int = 24  # crops per unseen photo for the identity 1-NN metric
    seed: int = 0

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None) -> PretrainConfig:
        """From a ConfigDict or dict; an unknown field is an error naming the known ones."""
        m = dict(m or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(m) - names
        if unknown:
            raise ValueError(f"unknown pretrain field(s) {sorted(unknown)}; known: {sorted(names)}")
        for k in ("crop_scale",):
            if k in m:
                m[k] = tuple(float(v) for v in m[k])
        return cls(**m)

    def vit(self) -> ViTConfig:
        # proj_dim=None: only the tower is exported; the SimCLR projector is separate.
        return ViTConfig(width=self.width, layers=self.layers, heads=self.heads,
                         patch_size=self.patch_size, mlp_dim=self.mlp_dim, proj_dim=None,
                         image_size=self.image_size)


# ---------------------------------------------------------------------------------------------
# Views


def random_view(photo: np.ndarray, rng: np.random.Generator, cfg: PretrainConfig, *,
                augment: bool = True) -> np.ndarray:
    """One random square crop of `photo`, resized to the tower's input and (optionally)
    flipped, colour-jittered, greyed and blurred; RGB uint8."""
    h, w = photo.shape[:2]
    short = min(h, w)
    side = max(8, int(rng.uniform(*cfg.crop_scale) * short))
    y = int(rng.integers(0, h - side + 1))
    x = int(rng.integers(0, w - side + 1))
    crop = cv2.resize(photo[y:y + side, x:x + side], (cfg.image_size, cfg.image_size),
                      interpolation=cv2.INTER_AREA)
    if not augment:
        return crop
    img = crop.astype(np.float32)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    j = cfg.jitter
    img = img * rng.uniform(1 - j, 1 + j)  # brightness
    mean = img.mean()
    img = (img - mean) * rng.uniform(1 - j, 1 + j) + mean  # contrast
    gray = img.mean(-1, keepdims=True)
    img = (img - gray) * rng.uniform(1 - j, 1 + j) + gray  # saturation
    if rng.random() < cfg.gray_prob:
        img = np.repeat(img.mean(-1, keepdims=True), 3, -1)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < cfg.blur_prob:
        img = cv2.GaussianBlur(np.ascontiguousarray(img), (0, 0), rng.uniform(0.1, 1.5))
    return np.ascontiguousarray(img)


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC → float32 with CLIP's mean/std, as the data pipeline feeds the detector."""
    x = images.astype(np.float32) / 255.0
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def view_pairs(photos: Sequence[np.ndarray], rng: np.random.Generator, cfg: PretrainConfig,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Two augmented views of `batch_size` random crops (photos drawn uniformly)."""
    idx = rng.integers(0, len(photos), cfg.batch_size)
    a = np.stack([random_view(photos[i], rng, cfg) for i in idx])
    b = np.stack([random_view(photos[i], rng, cfg) for i in idx])
    return normalise(a), normalise(b)


# ---------------------------------------------------------------------------------------------
# Model and loss


class Projector(nnx.Module):
    """SimCLR's MLP head on the pooled feature; discarded after pretraining."""

    def __init__(self, width: int, hidden: int, out: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(width, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.relu(self.fc1(x)))


class SimCLR(nnx.Module):
    def __init__(self, cfg: PretrainConfig, *, rngs: nnx.Rngs):
        self.tower = CLIPVisionTower(cfg.vit(), rngs=rngs)
        self.projector = Projector(cfg.width, cfg.proj_hidden, cfg.proj_dim, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.projector(self.tower(images))


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """SimCLR's NT-Xent loss over 2B views and the top-1 accuracy of finding each view's pair."""
    z = jnp.concatenate([z1, z2]).astype(jnp.float32)
    z = z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-6)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, sim)
    target = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
    loss = optax.softmax_cross_entropy_with_integer_labels(sim, target).mean()
    acc = jnp.mean(jnp.argmax(sim, -1) == target)
    return loss, acc


# ---------------------------------------------------------------------------------------------
# Feature quality


@nnx.jit
def _pooled(tower: CLIPVisionTower, images: jax.Array) -> jax.Array:
    return tower(images)


def features(tower: CLIPVisionTower, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """Pooled (ln_post) features, the ones the detector's head sees."""
    return np.concatenate([np.asarray(_pooled(tower, jnp.asarray(images[i:i + batch])))
                           for i in range(0, len(images), batch)])


def identity_crops(photos: Sequence[np.ndarray], cfg: PretrainConfig,
                   seed: int = 12345) -> tuple[np.ndarray, np.ndarray]:
    """Augmented random crops of each photo (fixed seed) and the photo index of each crop.

    Augmented, because un-augmented crops of one photo share its colour statistics, which
    even a random tower separates (measured: ~0.93 1-NN accuracy at initialisation)."""
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for i, p in enumerate(photos):
        for _ in range(cfg.knn_crops):
            imgs.append(random_view(p, rng, cfg))
            labels.append(i)
    return normalise(np.stack(imgs)), np.asarray(labels)


def identity_knn_accuracy(feats: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out cosine 1-NN accuracy of predicting which photo a crop comes from."""
    f = feats / np.linalg.norm(feats, axis=-1, keepdims=True).clip(1e-6)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    return float(np.mean(labels[np.argmax(sim, -1)] == labels))


# ---------------------------------------------------------------------------------------------
# Training


def _params(cfg: PretrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["crop_scale"] = list(d["crop_scale"])
    return d


def pretrain(photos: Sequence[np.ndarray], cfg: PretrainConfig, out_dir: str | os.PathLike, *,
             eval_photos: Sequence[np.ndarray] = (), source: Mapping[str, Any] | None = None,
             ) -> dict[str, Any]:
    """Train, write OUT_DIR/model.safetensors (+ config.json, pretrain.json) and return the
    record. If OUT_DIR already holds a tower pretrained with the same settings and source,
    nothing is trained and the stored record is returned; other settings are refused, so a
    directory never silently mixes two backbones."""
    out = Path(out_dir)
    record_path = out / RECORD_JSON
    want = {"params": _params(cfg), "source": dict(source or {})}
    if record_path.exists() and (out / WEIGHTS).exists():
        found = json.loads(record_path.read_text())
        if {"params": found.get("params"), "source": found.get("source")} == want:
            log.info("pretrained backbone found in %s: skipping pretraining", out)
            return found | {"skipped": True}
        raise FileExistsError(
            f"{out} holds a backbone pretrained with other settings ({found.get('params')}, "
            f"{found.get('source')}); delete it or choose another directory")
    if not photos:
        raise ValueError("no photographs to pretrain on")

    t0 = time.perf_counter()
    model = SimCLR(cfg, rngs=nnx.Rngs(cfg.seed))
    knn = {}
    if eval_photos and cfg.knn_crops:
        crops, labels = identity_crops(eval_photos, cfg)
        knn["init"] = identity_knn_accuracy(features(model.tower, crops), labels)

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(1, min(cfg.warmup_steps, cfg.steps - 1)), max(cfg.steps, 2))
    # No weight decay on biases, LayerNorms, embeddings (ViT practice).
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, a, b):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest)
            return nt_xent(m(a), m(b), cfg.temperature)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    rng = np.random.default_rng(cfg.seed)
    history: list[dict[str, float]] = []
    sums = [0.0, 0.0, 0]
    pending: list = []
    t_train = time.perf_counter()
    for i in range(1, cfg.steps + 1):
        a, b = view_pairs(photos, rng, cfg)  # built while the previous step runs
        params, opt_state, loss, acc = step(params, opt_state, a, b)
        pending.append((loss, acc))
        if i % cfg.log_every == 0 or i == cfg.steps:
            vals = jax.device_get(pending)
            pending = []
            sums = [sum(float(v[0]) for v in vals), sum(float(v[1]) for v in vals), len(vals)]
            entry = {"step": i, "loss": sums[0] / sums[2], "pair_acc": sums[1] / sums[2]}
            if not math.isfinite(entry["loss"]):
                raise FloatingPointError(f"SimCLR loss became {entry['loss']} at step {i}; "
                                         "lower demo.pretrain.lr")
            history.append(entry)
            rate = i / (time.perf_counter() - t_train)
            log.info("pretrain step %d/%d | %.2f steps/s | NT-Xent %.4f | pair acc %.3f",
                     i, cfg.steps, rate, entry["loss"], entry["pair_acc"])
    nnx.update(model, params)
    train_s = time.perf_counter() - t_train
    if knn:
        knn["pretrained"] = identity_knn_accuracy(features(model.tower, crops), labels)
        log.info("unseen-photo identity 1-NN accuracy: %.3f at init → %.3f pretrained "
                 "(chance %.3f)", knn["init"], knn["pretrained"], 1 / len(eval_photos))

    save_hf_clip_vision(model.tower, out)
    record = {**want, "history": history, "knn_identity_accuracy": knn,
              "knn_chance": 1 / len(eval_photos) if knn else None,
              "num_train_photos": len(photos), "num_eval_photos": len(eval_photos),
              "train_seconds": train_s, "total_seconds": time.perf_counter() - t0,
              "backend": jax.default_backend()}
    # Written last: its presence means the weights beside it are complete.
    atomic.write_json(record_path, record, sort_keys=False)
    return record | {"skipped": False}


def check_loads(out_dir: str | os.PathLike, image_size: int) -> ViTConfig:
    """Load the written tower back through the CLIP loader (what training will do)."""
    return load_clip_vision(Path(out_dir) / WEIGHTS, image_size=image_size).cfg
