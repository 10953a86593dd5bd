"""The FMSD training objective L = CE + λ_orth·L_orth + λ_spec·L_spec (DESIGN.md §1.5).

Config fields (ml_collections ConfigDict, read from `cfg.method` when present, else from `cfg`
itself; keyword overrides win):

    lambda_orth: float = 0.0          # Effort's released code trains with CE only
    lambda_spec: float = 0.0
    spectral_form: str = 'frobenius'  # 'frobenius' (Effort's L_ksv) | 'per_subspace' | 'squared'

A λ of zero is a Python-level decision: that term is never traced, so it costs nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fmsd_jax.method.losses import SPECTRAL_FORMS, orthogonality_loss, spectral_loss

LossFn = Callable[[nnx.Module, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    lambda_orth: float = 0.0
    lambda_spec: float = 0.0
    spectral_form: str = "frobenius"

    def __post_init__(self):
        if self.spectral_form not in SPECTRAL_FORMS:
            raise ValueError(
                f"method.spectral_form={self.spectral_form!r} is not one of {SPECTRAL_FORMS}"
            )
        if self.lambda_orth < 0 or self.lambda_spec < 0:
            raise ValueError("method.lambda_orth and method.lambda_spec must be >= 0")


def objective_config(cfg: Any = None, **overrides: Any) -> ObjectiveConfig:
    """Read the objective's fields from a ConfigDict/dict/object (its `.method` if it has one)."""
    fields = {f.name for f in dataclasses.fields(ObjectiveConfig)}
    src = cfg
    if src is not None and not isinstance(src, Mapping) and hasattr(src, "method"):
        src = src.method
    elif isinstance(src, Mapping) and "method" in src:
        src = src["method"]
    vals: dict[str, Any] = {}
    if src is not None:
        for f in fields:
            if isinstance(src, Mapping):
                if f in src:
                    vals[f] = src[f]
            elif hasattr(src, f):
                vals[f] = getattr(src, f)
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown objective field(s) {sorted(unknown)}; known: {sorted(fields)}")
    vals.update(overrides)
    return ObjectiveConfig(**vals)


def classification_terms(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return dict(ce=ce, accuracy=acc)


def make_loss_fn(cfg: Any = None, **overrides: Any) -> LossFn:
    """loss_fn(model, batch) -> (loss, aux); batch = {'image': NHWC, 'label': int (B,)}.

    aux holds loss, ce, orth, spec (unweighted; 0 when its λ is 0) and accuracy, all scalars.
    """
    oc = objective_config(cfg, **overrides)

    def loss_fn(
        model: nnx.Module, batch: Mapping[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        aux = classification_terms(model(batch["image"]), batch["label"])
        loss = aux["ce"]
        zero = jnp.zeros((), jnp.float32)
        aux["orth"] = aux["spec"] = zero
        if oc.lambda_orth:
            aux["orth"] = orthogonality_loss(model)
            loss = loss + oc.lambda_orth * aux["orth"]
        if oc.lambda_spec:
            aux["spec"] = spectral_loss(model, oc.spectral_form)
            loss = loss + oc.lambda_spec * aux["spec"]
        aux["loss"] = loss
        return loss, aux

    return loss_fn
