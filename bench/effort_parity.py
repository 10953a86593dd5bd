"""Does our `effort` regime *train* like Effort's PyTorch code? And are FMSD's losses what they say?

    python bench/effort_parity.py                  # both tables (needs torch + transformers)
    python bench/effort_parity.py --write-golden   # also rewrites tests/fixtures/effort_parity.npz

(1) Training: the tiny CLIP of tests/fixtures/clip/tiny/hf_vision (HF weights) becomes our
detector through the production path (`rebuild.open_run`, `make_optimizer`, `make_loss_fn`,
`train_step.make_train_step`; regime 'effort', optim 'adam' = torch-style Adam with L2 weight
decay, lr 2e-4, wd 5e-4, fp32) and Effort's PyTorch detector (`bench/effort_torch.py`: HF
CLIPVisionModel with `SVDResidualLinear` projections, its own SVD, torch Adam) with our head's
initial weights copied over. Both train STEPS steps on the same uint8 batches (normalised the
same way); the table compares the loss at every step and, at the end, the merged weights
W_s + U diag(s) Vᵀ of every decomposed projection and the head.

(2) Losses: a decomposition with K=2, d=2 of q, fc1 and fc2 (square, and both rectangular
orientations) with perturbed factors; our L_orth and L_spec (both forms), values and gradients
with respect to U, s, V, against `orth_loss_reference` / `spec_loss_reference` computed from
the definitions in float64 by torch autograd.

The test `tests/test_effort_parity.py` runs the same functions: live against torch when it is
installed, else against the golden numbers written here.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CKPT = ROOT / "tests" / "fixtures" / "clip" / "tiny" / "hf_vision"
GOLDEN = ROOT / "tests" / "fixtures" / "effort_parity.npz"
STEPS = 12
BATCH = 4
TARGETS = ("q", "k", "v", "out")
LOSS_TARGETS = ("q", "fc1", "fc2")  # a square weight and both rectangular orientations
LOSS_K, LOSS_D = 2, 2
SPECTRAL_FORMS = ("frobenius", "per_subspace")


def effort_config() -> Any:
    """Our `effort` regime on the tiny fixture, fp32, Effort's optimizer."""
    from fmsd_jax import config_base

    c = config_base.base_config()
    c.method.regime = "effort"
    config_base.apply_regime(c)
    c.model.variant = "auto"
    c.model.init_from = str(CKPT / "model.safetensors")
    c.model.image_size = c.data.image_size = 32
    c.train.batch_size = BATCH
    c.optim.name = "adam"  # torch Adam: weight decay as L2 in the gradient
    return c


def batches(steps: int = STEPS, batch: int = BATCH, size: int = 32, seed: int = 0
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    """uint8 NHWC images (as the input pipeline ships them) and int32 labels."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
             rng.integers(0, 2, batch).astype(np.int32)) for _ in range(steps)]


def train_ours(cfg: Any, data: list) -> dict[str, np.ndarray]:
    """Per-step losses, final merged weights {target: (L, in, out)} and head, from our step."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fmsd_jax import parallel
    from fmsd_jax.method.objective import make_loss_fn
    from fmsd_jax.method.optimizer import make_optimizer
    from fmsd_jax.run import factory, rebuild, train_step

    mesh = parallel.make_mesh(cfg.mesh)
    with tempfile.TemporaryDirectory() as workdir:
        run = rebuild.open_run(cfg, Path(workdir), mesh)
    head0 = {"head_kernel": np.asarray(run.trainable["head_kernel"][...]),
             "head_bias": np.asarray(run.trainable["head_bias"][...])}
    start = _factors(nnx.merge(run.graphdef, jax.device_get(run.trainable),
                               jax.device_get(run.frozen)))
    loss_fn = make_loss_fn(factory.objective_section(cfg))
    tx = make_optimizer(factory.optim_section(cfg), trainable_state=run.trainable,
                        layer_mask=run.mask, spec=run.spec, total_steps=len(data))
    state, state_sh = train_step.make_state(run, tx)
    images, labels = data[0]
    sample = {"image": jax.ShapeDtypeStruct(images.shape, jnp.uint8),
              "label": jax.ShapeDtypeStruct(labels.shape, jnp.int32)}
    sums = train_step.init_metric_sums(run, loss_fn, sample)
    step = train_step.make_train_step(run, loss_fn, tx, state_sh)
    losses = []
    for images, labels in data:
        batch = parallel.global_batch(mesh, {"image": images, "label": labels},
                                      ("image", "label"))
        state, sums = step(state, run.frozen, batch, sums)
        losses.append(float(sums["loss"]) / float(sums["count"]))
        sums = train_step.zero_metric_sums(sums.keys(), mesh)
    det = nnx.merge(run.graphdef, jax.device_get(state.trainable), jax.device_get(run.frozen))
    out = {"loss": np.asarray(losses, np.float64),
           "head_kernel": np.asarray(det.head_kernel[...]),
           "head_bias": np.asarray(det.head_bias[...])}
    end = _factors(det)
    for t in TARGETS:
        out[f"w_{t}"], out[f"pretrained_{t}"] = end[f"w_{t}"], start[f"w_{t}"]
        for n in ("u", "s", "v"):
            out[f"{n}0_{t}"], out[f"{n}1_{t}"] = start[f"{n}_{t}"], end[f"{n}_{t}"]
    out |= {f"init_{k}": v for k, v in head0.items()}
    return with_artifact_change(out)


def _factors(det: Any) -> dict[str, np.ndarray]:
    """u, s, v and the merged W_s + U diag(s) Vᵀ (as export merges it) of every target."""
    from fmsd_jax.method import decompose as decomp

    out = {}
    for t, m in decomp.decomposed_layers(det, TARGETS).items():
        out[f"w_{t}"] = np.asarray(m.merged_weight())
        out |= {f"{n}_{t}": np.asarray(getattr(m, n)[...]) for n in ("u", "s", "v")}
    return out


def torch_from_golden(golden: Any, ours: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Effort's numbers from the golden file: losses, head and factors as stored; the merged
    weights rebuilt as W − U₀ diag(s₀) V₀ᵀ + U diag(s) Vᵀ on the pretrained W (Effort's W_main
    is W re-synthesised from its top triplets: equal to within fp32 SVD accuracy, ~1e-6)."""
    out = {k.removeprefix("effort_"): np.asarray(golden[k]) for k in golden.files
           if k.startswith("effort_")}
    out = with_artifact_change(out)
    for t in TARGETS:
        out[f"w_{t}"] = ours[f"pretrained_{t}"] + out[f"da_{t}"]
    return out


def train_torch(cfg: Any, data: list, head_kernel: np.ndarray, head_bias: np.ndarray
                ) -> dict[str, np.ndarray]:
    """The same for Effort's PyTorch detector, from the same weights, on the same batches."""
    import torch
    import transformers
    from torch.nn import functional as F

    from bench.effort_torch import effort_adam, effort_detector, encoder_layers
    from fmsd_jax.data.config import CLIP_MEAN, CLIP_STD

    torch.manual_seed(0)
    hf = transformers.CLIPVisionModel.from_pretrained(CKPT, dtype=torch.float32,
                                                      attn_implementation="eager")
    model = effort_detector(hf, head_kernel, head_bias, TARGETS, kd=1).train()
    opt = effort_adam(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    # The detector's on-device normalisation, (x/255 − mean)/std, as fmsd_jax computes it.
    scale = np.asarray([1.0 / (255.0 * s) for s in CLIP_STD], np.float32)
    offset = np.asarray([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)], np.float32)
    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}

    def factors() -> dict[str, np.ndarray]:
        """Effort's trainable factors in our orientation: u (L, in, kd), s (L, kd), v (L, out,
        kd), and the merged weight (L, in, out), per target."""
        out = {}
        with torch.no_grad():
            for t in TARGETS:
                mods = [getattr(layer.self_attn, names[t]) for layer in encoder_layers(hf)]
                out[f"u_{t}"] = np.stack([m.V_residual.numpy().T for m in mods])
                out[f"s_{t}"] = np.stack([m.S_residual.numpy() for m in mods])
                out[f"v_{t}"] = np.stack([m.U_residual.numpy() for m in mods])
                out[f"w_{t}"] = np.stack([m.merged_weight().numpy().T for m in mods])
        return out

    start = factors()
    losses = []
    for images, labels in data:
        x = (images.astype(np.float32) * scale + offset).transpose(0, 3, 1, 2)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(torch.from_numpy(np.ascontiguousarray(x))),
                               torch.from_numpy(labels.astype(np.int64)))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    out = {"loss": np.asarray(losses, np.float64),
           "head_kernel": model.head.weight.detach().numpy().T.copy(),
           "head_bias": model.head.bias.detach().numpy().copy()}
    end = factors()
    for t in TARGETS:
        out[f"w_{t}"] = end[f"w_{t}"]
        for n in ("u", "s", "v"):
            out[f"{n}0_{t}"], out[f"{n}1_{t}"] = start[f"{n}_{t}"], end[f"{n}_{t}"]
    return with_artifact_change(out)


def with_artifact_change(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds da_<t>: how training changed U diag(s) Vᵀ, from the factors in float64 (W_s's
    fp32 rounding would swamp a change this small in the merged weight)."""
    for t in TARGETS:
        out[f"da_{t}"] = (_artifact64(out[f"u1_{t}"], out[f"s1_{t}"], out[f"v1_{t}"])
                          - _artifact64(out[f"u0_{t}"], out[f"s0_{t}"], out[f"v0_{t}"]))
    return out


def _artifact64(u: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """U diag(s) Vᵀ in float64 (u: rows × kd, v: cols × kd), batched over leading axes."""
    return np.einsum("...ik,...k,...jk->...ij", u.astype(np.float64), s.astype(np.float64),
                     v.astype(np.float64))


def fmsd_losses_ours(seed: int = 0) -> dict[str, np.ndarray]:
    """Pretrained weights, perturbed factors, and our L_orth / L_spec values and gradients."""
    import jax
    from flax import nnx

    from fmsd_jax.method import decompose as decomp
    from fmsd_jax.method import losses
    from fmsd_jax.model.weights.load import load_clip_vision

    tower = load_clip_vision(CKPT / "model.safetensors")
    blocks = tower.transformer.blocks
    parent = {t: blocks.attn if t in ("q", "k", "v", "out") else blocks.mlp
              for t in LOSS_TARGETS}
    out = {f"w_{t}": np.asarray(getattr(parent[t], t).kernel[...], np.float64)
           for t in LOSS_TARGETS}
    decomp.decompose(tower, targets=LOSS_TARGETS, num_subspaces=LOSS_K, rank=LOSS_D)
    rng = np.random.default_rng(seed)
    for t in LOSS_TARGETS:  # a trained-looking point, where every term is non-zero
        m = getattr(parent[t], t)
        for name, scale in (("u", 0.05), ("v", 0.05), ("s", 0.1)):
            x = np.asarray(getattr(m, name)[...])
            noise = rng.standard_normal(x.shape).astype(np.float32)
            x = x * (1 + scale * noise) if name == "s" else x + scale * noise
            getattr(m, name)[...] = x
            out[f"{name}_{t}"] = x.astype(np.float64)
        out[f"s0_{t}"] = np.asarray(m.s0[...], np.float64)

    graphdef, factors, rest = nnx.split(tower, decomp.ArtifactFactor, ...)
    terms = {"orth": losses.orthogonality_loss}
    terms |= {f"spec_{f}": (lambda mdl, f=f: losses.spectral_loss(mdl, f)) for f in SPECTRAL_FORMS}
    for key, fn in terms.items():
        value, grads = jax.value_and_grad(
            lambda p, fn=fn: fn(nnx.merge(graphdef, p, rest)))(factors)
        out[key] = np.asarray(value, np.float64)
        for t in LOSS_TARGETS:
            g = grads["transformer"]["blocks"][parent_name(t)][t]
            for name in ("u", "s", "v"):
                out[f"{key}_grad_{name}_{t}"] = np.asarray(g[name][...], np.float64)
    return out


def parent_name(target: str) -> str:
    return "attn" if target in ("q", "k", "v", "out") else "mlp"


def fmsd_losses_torch(ours: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The definitions, in float64, at the same points; gradients by torch autograd."""
    import torch

    from bench.effort_torch import orth_loss_reference, spec_loss_reference

    out = {}
    forms = {"orth": None, **{f"spec_{f}": f for f in SPECTRAL_FORMS}}
    for key, form in forms.items():
        total = torch.zeros((), dtype=torch.float64)
        leaves = {}
        for t in LOSS_TARGETS:
            w = torch.from_numpy(ours[f"w_{t}"])
            s0 = torch.from_numpy(ours[f"s0_{t}"])
            fac = {n: torch.from_numpy(ours[f"{n}_{t}"]).requires_grad_(True)
                   for n in ("u", "s", "v")}
            leaves[t] = fac
            for layer in range(w.shape[0]):
                u, s, v = fac["u"][layer], fac["s"][layer], fac["v"][layer]
                if form is None:
                    total = total + orth_loss_reference(w[layer], u, v, LOSS_K * LOSS_D)
                else:
                    total = total + spec_loss_reference(w[layer], u, s, v, s0[layer], LOSS_K,
                                                        form)
        total.backward()
        out[key] = np.asarray(total.item())
        for t, fac in leaves.items():
            for name, x in fac.items():
                grad = x.grad if x.grad is not None else torch.zeros_like(x)  # s in L_orth
                out[f"{key}_grad_{name}_{t}"] = grad.numpy().copy()
    return out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| / max |b|: the error relative to the reference's scale."""
    return float(np.max(np.abs(np.asarray(a) - b)) / max(float(np.max(np.abs(b))), 1e-30))


def effort_keys() -> list[str]:
    """What is compared."""
    return ["loss", "head_kernel", "head_bias", *[f"w_{t}" for t in TARGETS],
            *[f"da_{t}" for t in TARGETS]]


def golden_keys() -> list[str]:
    """What the golden file stores of Effort's run (the rest is derived from it)."""
    return ["loss", "head_kernel", "head_bias",
            *[f"{n}{i}_{t}" for t in TARGETS for n in ("u", "s", "v") for i in (0, 1)]]


def loss_keys() -> list[str]:
    keys = ["orth", *[f"spec_{f}" for f in SPECTRAL_FORMS]]
    return keys + [f"{k}_grad_{n}_{t}" for k in keys for n in ("u", "s", "v")
                   for t in LOSS_TARGETS]


def print_tables(ours: dict, theirs: dict, loss_ours: dict, loss_theirs: dict) -> None:
    print(f"Effort training parity: tiny CLIP ({CKPT.relative_to(ROOT)}), {STEPS} steps, "
          f"batch {BATCH}, fp32, Adam lr 2e-4 + L2 5e-4\n")
    print("| step | loss ours | loss Effort (PyTorch) | abs diff | rel diff |")
    print("|---:|---:|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(ours["loss"], theirs["loss"], strict=True), 1):
        print(f"| {i} | {a:.7f} | {b:.7f} | {abs(a - b):.1e} | {abs(a - b) / abs(b):.1e} |")
    print("\n| final weights | max abs diff | max abs diff / max abs |")
    print("|---|---:|---:|")
    for k in effort_keys()[1:]:
        d = float(np.max(np.abs(ours[k] - theirs[k])))
        print(f"| {k} | {d:.1e} | {rel(ours[k], theirs[k]):.1e} |")
    moved = {t: float(np.max(np.abs(theirs[f"da_{t}"])) / np.max(np.abs(theirs[f"w_{t}"])))
             for t in TARGETS}
    print("w_*: merged W_s + U diag(s) Vᵀ at the end; da_*: the change of U diag(s) Vᵀ over "
          "the run, in float64 (max |da| / max |W|: "
          f"{', '.join(f'{t} {v:.1e}' for t, v in moved.items())}); the head moved by "
          f"{rel(ours['head_kernel'], ours['init_head_kernel']):.1e} of its scale")
    print(f"\nFMSD losses vs their float64 definitions (K={LOSS_K}, d={LOSS_D}, "
          f"{', '.join(LOSS_TARGETS)}; perturbed factors)\n")
    print("| term | ours | reference | rel diff | worst gradient rel diff |")
    print("|---|---:|---:|---:|---:|")
    for key in ["orth", *[f"spec_{f}" for f in SPECTRAL_FORMS]]:
        g = max(rel(loss_ours[k], loss_theirs[k]) for k in loss_keys()
                if k.startswith(f"{key}_grad_"))
        print(f"| {key} | {float(loss_ours[key]):.6f} | {float(loss_theirs[key]):.6f} | "
              f"{rel(loss_ours[key], loss_theirs[key]):.1e} | {g:.1e} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write-golden", action="store_true",
                    help=f"write the PyTorch numbers to {GOLDEN.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    cfg = effort_config()
    data = batches()
    ours = train_ours(cfg, data)
    theirs = train_torch(cfg, data, ours["init_head_kernel"], ours["init_head_bias"])
    loss_ours = fmsd_losses_ours()
    loss_theirs = fmsd_losses_torch(loss_ours)
    print_tables(ours, theirs, loss_ours, loss_theirs)
    if args.write_golden:
        golden = {f"effort_{k}": theirs[k] for k in golden_keys()}
        golden |= {f"losses_{k}": np.asarray(loss_theirs[k], np.float32 if "grad" in k
                                             else np.float64) for k in loss_keys()}
        np.savez_compressed(GOLDEN, **golden)
        print(f"\nwrote {GOLDEN} ({GOLDEN.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
