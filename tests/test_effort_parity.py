"""Our `effort` regime trains like Effort's PyTorch code; FMSD's losses equal their definitions.

The harness is `bench/effort_parity.py` (it prints the full tables). With torch installed the
PyTorch side runs live, and the committed golden numbers are checked against it too, so a stale
golden file fails; without torch our side is compared with the golden numbers alone
(tests/fixtures/effort_parity.npz, rewritten by `python bench/effort_parity.py --write-golden`).

Tolerances (fp32; both sides compute in fp32, the loss references in fp64):
* loss at every step and final merged weights / head: 1e-5 relative (max |diff| / max |ref|).
  The two sides sum in different orders (einsum vs HF eager attention, XLA vs ATen matmuls) and
  Effort re-synthesises W_main from its own SVD (reconstruction error ~n·eps ≈ 1e-6 for n = 64);
  measured ≤ 6e-7 on losses and ≤ 1.4e-6 on weights, so 1e-5 is ~10× above what fp32 gives
  and 10× tighter than the 1e-4 the issue expected.
* change of U diag(s) Vᵀ over the run: 1e-4 relative. It is ~1e-4 of W, so the ~1e-7 relative
  disagreement of the two SVDs' starting factors weighs ~1e3 more here; measured ≤ 1.9e-5.
* L_orth / L_spec values 1e-5 and gradients 1e-4 relative to float64 definitions: ours runs in
  fp32 and its semantic term projects onto the complement of an fp32 SVD basis (orthonormal to
  ~1e-6); measured ≤ 6.2e-7 (values) and ≤ 7e-6 (gradients).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import effort_parity as P  # noqa: E402

# Two short trainings and the loss gradients: ~45 s of CPU, so with the end-to-end tests.
pytestmark = pytest.mark.slow

TORCH = importlib.util.find_spec("torch") is not None and \
    importlib.util.find_spec("transformers") is not None
STEP_TOL, CHANGE_TOL = 1e-5, 1e-4
VALUE_TOL, GRAD_TOL = 1e-5, 1e-4


def assert_effort_parity(ours: dict, theirs: dict, what: str) -> None:
    np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=STEP_TOL, atol=0,
                               err_msg=f"per-step loss vs {what}")
    for key in P.effort_keys()[1:]:
        tol = CHANGE_TOL if key.startswith("da_") else STEP_TOL
        assert P.rel(ours[key], theirs[key]) <= tol, (key, P.rel(ours[key], theirs[key]), what)


def assert_loss_parity(ours: dict, theirs: dict, what: str) -> None:
    for key in P.loss_keys():
        tol = GRAD_TOL if "_grad_" in key else VALUE_TOL
        assert P.rel(ours[key], theirs[key]) <= tol, (key, P.rel(ours[key], theirs[key]), what)


@pytest.fixture(scope="module")
def ours():
    data = P.batches()
    return P.train_ours(P.effort_config(), data), data


@pytest.fixture(scope="module")
def golden():
    return np.load(P.GOLDEN)


def test_training_moves_the_weights_it_compares(ours):
    """A parity means something only if training changed more than the tolerance: the merged
    weights move by 8e-5–4e-4 of their scale (compared at 1e-5, and their change itself at
    1e-4 of its own scale), the head by ~2e-2."""
    run, _ = ours
    assert len(run["loss"]) == P.STEPS >= 10
    for t in P.TARGETS:
        moved = np.max(np.abs(run[f"da_{t}"])) / np.max(np.abs(run[f"w_{t}"]))
        assert moved > 5 * STEP_TOL, (t, moved)  # ≥ 7.9e-5 measured
    assert P.rel(run["head_kernel"], run["init_head_kernel"]) > 1e-3


@pytest.mark.skipif(not TORCH, reason="torch/transformers not installed: golden test below")
def test_effort_trains_like_effort_pytorch_live(ours, golden):
    run, data = ours
    theirs = P.train_torch(P.effort_config(), data, run["init_head_kernel"],
                           run["init_head_bias"])
    assert_effort_parity(run, theirs, "PyTorch Effort (live)")
    # The golden file still describes what PyTorch computes.
    stored = P.torch_from_golden(golden, run)
    np.testing.assert_allclose(stored["loss"], theirs["loss"], rtol=STEP_TOL, atol=0)


def test_effort_trains_like_effort_pytorch_golden(ours, golden):
    run, _ = ours
    assert_effort_parity(run, P.torch_from_golden(golden, run), "golden PyTorch numbers")


@pytest.fixture(scope="module")
def loss_ours():
    return P.fmsd_losses_ours()


@pytest.mark.skipif(not TORCH, reason="torch not installed: golden test below")
def test_fmsd_losses_match_their_definitions_live(loss_ours, golden):
    theirs = P.fmsd_losses_torch(loss_ours)
    assert_loss_parity(loss_ours, theirs, "float64 definitions (live)")
    # The golden file is current: it agrees with the live definitions within the parity's own
    # tolerances. Not tighter: the definitions are evaluated on our float32 factors, whose last
    # bits differ between CPUs (an AVX-512 AMD host against the golden's: values 2.9e-7,
    # gradients up to 8.8e-6 apart; a fixed 1e-6 failed there).
    assert_loss_parity({k: golden[f"losses_{k}"] for k in P.loss_keys()}, theirs,
                       "golden file against the live float64 definitions")


def test_fmsd_losses_match_their_definitions_golden(loss_ours, golden):
    stored = {k: golden[f"losses_{k}"] for k in P.loss_keys()}
    assert_loss_parity(loss_ours, stored, "golden float64 definitions")
    assert min(float(loss_ours[k]) for k in ("orth", "spec_frobenius")) > 1.0  # non-trivial
