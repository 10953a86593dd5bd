"""The FMSD training objective L = CE + λ_orth·L_orth + λ_spec·L_spec (DESIGN.md §1.5).

Settings (`ObjectiveConfig`, built from `config.method` by `fmsd_jax.run.factory.objective_section`;
config_base.py holds the defaults and their reasons, this module none):

    lambda_orth, lambda_spec: float >= 0
    spectral_form: str                # 'frobenius' (Effort's L_ksv) | 'per_subspace' | 'squared'

A λ of zero is a Python-level decision: that term is never traced, so it costs nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fmsd_jax.method.losses import SPECTRAL_FORMS, orthogonality_loss, spectral_loss

LossFn = Callable[[nnx.Module, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The objective's settings, typed. No field has a default: config_base.py is the one
    default table, so a loss built here and one built by a run cannot disagree."""

    lambda_orth: float
    lambda_spec: float
    spectral_form: str

    def __post_init__(self) -> None:
        if self.spectral_form not in SPECTRAL_FORMS:
            raise ValueError(
                f"method.spectral_form={self.spectral_form!r} is not one of {SPECTRAL_FORMS}"
            )
        if self.lambda_orth < 0 or self.lambda_spec < 0:
            raise ValueError("method.lambda_orth and method.lambda_spec must be >= 0")


# Cross-entropy alone (the layer-mask estimator's and the head warm-up's loss); with
# lambda_spec 0 the spectral form is never read.
CROSS_ENTROPY = ObjectiveConfig(lambda_orth=0.0, lambda_spec=0.0, spectral_form="frobenius")


def classification_terms(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return dict(ce=ce, accuracy=acc)


def make_loss_fn(oc: ObjectiveConfig) -> LossFn:
    """loss_fn(model, batch) -> (loss, aux); batch = {'image': NHWC, 'label': int (B,)}.

    aux holds loss, ce, orth, spec (unweighted; 0 when its λ is 0) and accuracy, all scalars.
    """

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
