"""Per-input explanations for predict and the service: each artifact subspace's share of the
fake logit (evaluators/subspaces.py) and a patch map of where it comes from
(evaluators/saliency.py), for one device batch at a time.

Built once per run (`Explainer.for_run`): the subspace variants are merged once, outside the
jitted predict, and the map function is compiled once, so explaining a batch runs only
programs that already exist.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from fmsd_jax.evaluators import saliency, subspaces


@dataclasses.dataclass
class Explainer:
    run: Any
    trainable: Any
    predict: Any
    steps: int
    variants: subspaces.Ablations | None  # None: the run has no K > 1 subspaces
    subspaces_note: str | None  # why there are no per-subspace numbers, in words

    @classmethod
    def for_run(cls, run: Any, trainable: Any, predict: Any, steps: int) -> Explainer:
        reason = subspaces.skip_reason(run)
        variants = None if reason else subspaces.ablations(run, trainable)
        return cls(run, trainable, predict, int(steps), variants, reason)

    def __call__(self, images: jax.Array) -> dict[str, np.ndarray | None]:
        """For a device batch: 'subspaces' (B, K) Δ fake logit when each subspace's training
        is undone (None without subspaces), 'map' (B, grid_h, grid_w) integrated gradients
        of the fake logit per patch, and 'completeness_gap' (B,) how far each map's sum is from
        the logit's change from the baseline (relative), all this process's rows."""
        out = saliency.saliency_maps(self.run, self.trainable, images, self.steps)
        per_subspace = (None if self.variants is None else subspaces.per_input_subspaces(
            self.run, self.predict, self.variants, images))
        return {"subspaces": per_subspace, "map": out["map"],
                "completeness_gap": saliency.completeness_gap(out)}
