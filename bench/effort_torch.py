"""PyTorch references: Effort's detector as its code builds it, and FMSD's losses as written.

Shared by `bench/vs_pytorch.py` (speed) and `bench/effort_parity.py` / the parity tests
(numbers). Not part of the package: torch is a development dependency only.

* `effort_detector`: Hugging Face's CLIP vision tower whose attention projections are Effort's
  `SVDResidualLinear` (DeepfakeBench `effort_detector.py`): W = W_main (frozen, the top r
  singular triplets, re-synthesised) + U_res diag(S_res) V_res (trainable, rebuilt every
  forward), pooler_output → Linear(width, 2), trained with CE and torch Adam (L2 weight decay).
* `orth_loss_reference` / `spec_loss_reference`: FMSD's L_orth and L_spec computed naively from
  their definitions (fmsd_jax/method/losses.py's docstring), on the full concatenated bases and
  the rebuilt weights, in float64: no expansion, no trick, so agreement checks the expansions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

HF_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}


class SVDResidualLinear(nn.Module):
    """W = W_main (frozen, top r triplets) + U_res diag(S_res) V_res (trainable, rebuilt)."""

    def __init__(self, linear: nn.Linear, r: int):
        super().__init__()
        w = linear.weight.data.float()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        self.register_buffer("weight_main", u[:, :r] @ torch.diag(s[:r]) @ vh[:r])
        self.register_buffer("U_r", u[:, :r].contiguous())
        self.register_buffer("V_r", vh[:r].contiguous())
        self.register_buffer("weight_original_fnorm", torch.linalg.norm(w))
        self.U_residual = nn.Parameter(u[:, r:].contiguous())
        self.S_residual = nn.Parameter(s[r:].contiguous())
        self.V_residual = nn.Parameter(vh[r:].contiguous())
        self.bias = (nn.Parameter(linear.bias.data.clone(), requires_grad=False)
                     if linear.bias is not None else None)

    def merged_weight(self) -> torch.Tensor:
        """(out, in), torch.nn.Linear's layout."""
        return self.weight_main + self.U_residual @ torch.diag(self.S_residual) @ self.V_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged_weight(), self.bias)

    def compute_orthogonal_loss(self) -> torch.Tensor:
        u = torch.cat((self.U_r, self.U_residual), dim=1)
        v = torch.cat((self.V_r, self.V_residual), dim=0)
        uut, vvt = u @ u.t(), v @ v.t()
        eye_u = torch.eye(uut.size(0), device=uut.device)
        eye_v = torch.eye(vvt.size(0), device=vvt.device)
        return 0.5 * torch.norm(uut - eye_u, p="fro") + 0.5 * torch.norm(vvt - eye_v, p="fro")

    def compute_keepsv_loss(self) -> torch.Tensor:
        return torch.abs(torch.norm(self.merged_weight(), p="fro") ** 2
                         - self.weight_original_fnorm ** 2)


def encoder_layers(hf: Any) -> Any:
    # transformers < 5 nests the tower under `.vision_model`; 5.x flattened it.
    return getattr(hf, "vision_model", hf).encoder.layers


def effort_detector(hf: Any, head_w: Any, head_b: Any, targets: tuple[str, ...], kd: int) -> Any:
    """Effort's detector: HF CLIP vision tower with SVD-residual projections and a linear head."""
    for p in hf.parameters():
        p.requires_grad_(False)
    for layer in encoder_layers(hf):
        for t in targets:
            lin = getattr(layer.self_attn, HF_NAMES[t])
            r = min(lin.weight.shape) - kd
            setattr(layer.self_attn, HF_NAMES[t], SVDResidualLinear(lin, r))
    return torch_detector(hf, head_w, head_b)


def torch_detector(hf: Any, head_w: Any, head_b: Any) -> Any:
    """Effort's detector shape: HF CLIP tower's pooler_output → Linear(width, 2), our head."""

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = hf
            self.head = nn.Linear(head_w.shape[0], head_w.shape[1])
            with torch.no_grad():
                self.head.weight.copy_(torch.from_numpy(head_w.T.copy()))
                self.head.bias.copy_(torch.from_numpy(head_b.copy()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(pixel_values=x).pooler_output)

        def regularisers(self) -> tuple[torch.Tensor, torch.Tensor]:
            """Σ Effort orthogonal loss, Σ keep-singular-value loss over its SVD layers."""
            mods = [m for m in self.modules() if hasattr(m, "compute_orthogonal_loss")]
            return (sum(m.compute_orthogonal_loss() for m in mods),
                    sum(m.compute_keepsv_loss() for m in mods))

    return Detector()


def effort_adam(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Effort's optimizer: torch Adam (weight decay as an L2 term in the gradient)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=weight_decay)


# ---------------------------------------------------------------------------------------------
# FMSD's regularisers from their definitions (one weight matrix W = U Σ Vᵀ, in × out).


def _side_orth(semantic: torch.Tensor, artifact: torch.Tensor) -> torch.Tensor:
    """‖ÛᵀÛ − I‖²_F − ‖U_rᵀU_r − I‖²_F with Û = [U_r | U_a] (the frozen block removed)."""
    full = torch.cat((semantic, artifact), dim=1)
    eye_full = torch.eye(full.shape[1], dtype=full.dtype)
    eye_sem = torch.eye(semantic.shape[1], dtype=full.dtype)
    return (torch.sum((full.T @ full - eye_full) ** 2)
            - torch.sum((semantic.T @ semantic - eye_sem) ** 2))


def orth_loss_reference(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, kd: int
                        ) -> torch.Tensor:
    """L_orth of one decomposed weight: the U side plus the V side. `w` (in × out) is the
    pretrained weight, whose top n − K·d singular vectors are the semantic bases."""
    uw, _, vwh = torch.linalg.svd(w, full_matrices=False)
    r = min(w.shape) - kd  # the top r singular vectors of each side are its semantic basis
    return _side_orth(uw[:, :r], u) + _side_orth(vwh[:r].T, v)


def spec_loss_reference(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                        s0: torch.Tensor, num_subspaces: int, form: str) -> torch.Tensor:
    """L_spec of one decomposed weight. 'frobenius': |‖Ŵ‖²_F − ‖W‖²_F| with Ŵ = W_s + U diag(s) Vᵀ
    and W_s = W − U₀ diag(s₀) V₀ᵀ rebuilt; 'per_subspace': Σ_k |‖U_k diag(s_k) V_kᵀ‖²_F −
    ‖s_k,0‖²|."""
    if form == "frobenius":
        uw, sw, vwh = torch.linalg.svd(w, full_matrices=False)
        kd = s.shape[0]
        w_sem = uw[:, :-kd] @ torch.diag(sw[:-kd]) @ vwh[:-kd]
        w_hat = w_sem + u @ torch.diag(s) @ v.T
        return torch.abs(torch.sum(w_hat ** 2) - torch.sum(w ** 2))
    if form == "per_subspace":
        d = s.shape[0] // num_subspaces
        total = torch.zeros((), dtype=w.dtype)
        for k in range(num_subspaces):
            sl = slice(k * d, (k + 1) * d)
            a = u[:, sl] @ torch.diag(s[sl]) @ v[:, sl].T
            total = total + torch.abs(torch.sum(a ** 2) - torch.sum(s0[sl] ** 2))
        return total
    raise ValueError(f"no reference for spectral_form {form!r}")

