"""The artifact-subspace ablation (evaluators/subspaces.py) and its report (subspace_report.py).

What "exactly" means for "undoing every subspace gives the pretrained backbone": the undone
factors are U₀, s₀, V₀ bit for bit (checked), and the detector then computes
x·W_s + ((x·U₀)·s₀)·V₀ᵀ in each decomposed layer where the pretrained detector computes x·W,
with W_s = W − U₀ diag(s₀) V₀ᵀ formed in float32. The two agree to float32 rounding, not
bitwise: W_s + U₀ diag(s₀) V₀ᵀ is W to about one ulp per entry, and the factorised path
rounds two products where the dense one rounds one. Measured on the tiny tower (2 blocks × 4
projections): 2.4e-7 on logits of size ~1, so the bound is 1e-5, while undoing one trained
subspace of this fixture moves the logits by more than 1e-3: a subspace left trained, or
zeroed instead of undone, fails. Undoing nothing gives the trained logits bit for bit.

The run is the tiny CLIP decomposed as FMSD (K = 4, d = 1), its "training" simulated by moving
every artifact factor and the head by a seeded random amount (what is tested is the undo, not
training), or by moving one subspace only, where every number of the ablation is known by
construction."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, counting_compiles, make_cfg, overlapping_tick_labels, too_small
from flax import nnx

from fmsd_jax import parallel
from fmsd_jax.data import sources
from fmsd_jax.evaluators import scoring, subspace_report, subspaces
from fmsd_jax.method import decompose as decomp
from fmsd_jax.model.detector import HeadParam
from fmsd_jax.run import factory, rebuild

ONE = scoring.temperature_arg(1.0)


@pytest.fixture(scope="module")
def fmsd(tiny_clip_checkpoint, tiny_benchmark, tmp_path_factory):
    """(cfg, run, trained leaves, predict) of a K = 4 FMSD run of the tiny CLIP."""
    cfg = make_cfg(tiny_clip_checkpoint, tiny_benchmark)
    cfg.method.mask.enabled = False
    run = rebuild.open_run(cfg, tmp_path_factory.mktemp("wd"), parallel.make_mesh(cfg.mesh),
                           estimate=False)
    assert subspaces.subspace_count(run) == 4 and run.spec.rank == 1
    return cfg, run, moved(run, range(4), seed=0), scoring.make_predict_fn(run.graphdef, run.mesh)


def moved(run, ks, *, seed: int, head: bool = True):
    """run.trainable with subspaces `ks` of every layer (and the head) moved at random, as
    training would move them, on the same shardings."""
    rng = np.random.default_rng(seed)
    cols = subspaces.undo_columns(run, ks)  # the columns of ks

    def move(path, x):
        x = np.asarray(x)
        if any(getattr(p, "key", None) in ("u", "s", "v") for p in path):
            step = rng.normal(0.0, 0.5, x.shape) * (np.abs(x).mean() + 1e-3)
            return x + np.where(cols, step, 0.0).astype(x.dtype)
        return x + (rng.normal(0.0, 0.3, x.shape).astype(x.dtype) if head else 0)

    out = jax.tree_util.tree_map_with_path(move, run.trainable)
    return jax.tree.map(lambda n, o: jax.device_put(n, o.sharding), out, run.trainable)


def images(run, n=8, seed=1):
    rng = np.random.default_rng(seed)
    host = {"image": rng.integers(0, 256, (n, 32, 32, 3), np.uint8)}
    return parallel.global_batch(run.mesh, host, ("image",))["image"]


def logit(predict, run, trainable, x):
    return np.asarray(predict(trainable, run.frozen, x, ONE)["logit"])


def pretrained_logits(cfg, run, trainable, x) -> np.ndarray:
    """The pretrained detector of model.init_from, undecomposed, with the trained head."""
    det = factory.build_detector(cfg)
    nnx.update(det, nnx.state(nnx.merge(run.graphdef, trainable, run.frozen), HeadParam))
    out = np.asarray(det(jnp.asarray(np.asarray(x))))
    return out[:, 1] - out[:, 0]


def factors(run, trainable) -> dict:
    model = nnx.merge(run.graphdef, trainable, run.frozen)
    return {t: layer for t, layer in decomp.decomposed_layers(model, run.spec.targets).items()}


def test_undo_all_is_the_pretrained_backbone_and_undo_none_the_trained(fmsd):
    cfg, run, trained, predict = fmsd
    x = images(run)
    before = jax.tree.map(np.asarray, trained)
    everything = subspaces.undo_subspaces(run, trained, range(4))
    for layer in factors(run, everything).values():  # bit for bit the pretrained triplets
        for name in ("u", "s", "v"):
            np.testing.assert_array_equal(getattr(layer, name)[...],
                                          getattr(layer, f"{name}0")[...])
    heads = [nnx.state(nnx.merge(run.graphdef, t, run.frozen), HeadParam)
             for t in (trained, everything)]
    jax.tree.map(np.testing.assert_array_equal, *heads)  # the head stays trained

    reference = pretrained_logits(cfg, run, trained, x)
    got_all = logit(predict, run, everything, x)
    np.testing.assert_allclose(got_all, reference, rtol=0, atol=1e-5)
    got_trained = logit(predict, run, trained, x)
    assert np.abs(got_trained - reference).max() > 1e-3  # the fixture's training shows
    nothing = subspaces.undo_subspaces(run, trained, [])
    np.testing.assert_array_equal(logit(predict, run, nothing, x), got_trained)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, trained))
    with pytest.raises(ValueError, match=r"subspace\(s\) \[4\] do not exist"):
        subspaces.undo_subspaces(run, trained, [4])


def test_undoing_a_moved_subspace_and_only_it_changes_the_logits(fmsd):
    """Only subspace 2 (and the head) moved: undoing 2 is undoing everything, undoing any
    other changes nothing, bit for bit; the per-input Δ is zero but for subspace 2."""
    _, run, _, predict = fmsd
    x = images(run)
    one = moved(run, [2], seed=3)
    trained = logit(predict, run, one, x)
    undone_all = logit(predict, run, subspaces.undo_subspaces(run, one, range(4)), x)
    np.testing.assert_array_equal(logit(predict, run, subspaces.undo_subspaces(run, one, [2]), x),
                                  undone_all)
    for k in (0, 1, 3):
        np.testing.assert_array_equal(
            logit(predict, run, subspaces.undo_subspaces(run, one, [k]), x), trained)
    delta = subspaces.per_input_subspaces(run, predict, subspaces.ablations(run, one), x)
    assert delta.shape == (8, 4) and delta.dtype == np.float32
    np.testing.assert_array_equal(delta[:, [0, 1, 3]], 0.0)
    np.testing.assert_allclose(delta[:, 2], trained - undone_all, rtol=0, atol=0)
    assert np.abs(delta[:, 2]).min() > 1e-4


def test_every_variant_runs_the_compiled_predict(fmsd):
    _, run, trained, predict = fmsd
    x = images(run, seed=2)
    calls: list[int] = []
    counted = counting_compiles(predict, calls)
    variants = subspaces.ablations(run, trained)
    for t in [trained, variants.none, *variants.undone, *variants.only]:
        counted(t, run.frozen, x, ONE)["logit"].block_until_ready()
        same = jax.tree.map(lambda a, b: a.sharding == b.sharding and a.dtype == b.dtype, t,
                            trained)
        assert all(jax.tree.leaves(same))
    assert calls[1:] == [0] * (len(calls) - 1), calls  # at most the first call compiles


def test_ablation_of_one_moved_subspace_on_a_test_set(fmsd):
    """Every number of the record is known: Δ = 0 for the untouched subspaces, 'only 2' is
    the trained detector, 'only k' for k ≠ 2 the none-trained one."""
    cfg, run, _, predict = fmsd
    one = moved(run, [2], seed=3)
    rec = subspaces.subspace_ablation(cfg, run, one, predict, "SynBlend")
    n = len(sources.record_dataset(cfg.data, "SynBlend", "test")[0])
    assert rec["num_real"] + rec["num_fake"] == n and min(rec["num_real"], rec["num_fake"]) > 0
    assert (rec["num_subspaces"], rec["rank"], rec["split"]) == (4, 1, "test")
    subs = rec["subspaces"]
    assert [s["subspace"] for s in subs] == [0, 1, 2, 3]
    for k in (0, 1, 3):
        assert subs[k]["delta_real"] == 0.0 and subs[k]["delta_fake"] == 0.0
        assert subs[k]["only_frame_auc"] == rec["none_trained_frame_auc"]
    assert subs[2]["only_frame_auc"] == rec["trained_frame_auc"]
    assert abs(subs[2]["delta_fake"]) > 1e-4 and abs(subs[2]["delta_real"]) > 1e-4
    assert 0.0 <= rec["trained_frame_auc"] <= 1.0


def test_runs_without_several_subspaces_are_skipped_in_words(tiny_clip_checkpoint,
                                                             tiny_benchmark, tmp_path):
    cfg = make_cfg(tiny_clip_checkpoint, tiny_benchmark, "effort_b16")
    run = rebuild.open_run(cfg, tmp_path, parallel.make_mesh(cfg.mesh), estimate=False)
    assert subspaces.subspace_count(run) == 1
    rec = subspaces.subspace_ablation(cfg, run, run.trainable, None, "SynBlend")
    assert rec == {"dataset": "SynBlend", "split": "test",
                   "skipped": subspaces.skip_reason(run)} and "K = 1" in rec["skipped"]
    text = subspace_report.subspace_markdown({"SynBlend": rec})
    assert text.startswith(subspace_report.HEADING) and "Not measured: this run has one" in text


def record(name, deltas, *, sd=0.1, n=200, auc=0.8):
    """A hand-made ablation record: deltas[k] = (Δ fake, Δ real)."""
    return {"dataset": name, "split": "test", "num_subspaces": len(deltas), "rank": 1,
            "num_real": n, "num_fake": n, "trained_frame_auc": auc,
            "none_trained_frame_auc": auc - 0.2,
            "subspaces": [{"subspace": k, "delta_fake": f, "delta_real": r, "delta_fake_sd": sd,
                           "delta_real_sd": sd, "only_frame_auc": auc - 0.1 + 0.01 * k}
                          for k, (f, r) in enumerate(deltas)]}


def test_reading_says_whether_families_lean_on_different_subspaces():
    same = {"A": record("A", [(0.5, 0.0), (0.1, 0.0)]), "B": record("B", [(0.4, 0.1), (0.0, 0.0)])}
    assert subspace_report.reading(same).startswith("Subspace 0 separates fakes from reals most "
                                                    "on every test set (A +0.500, B +0.300)")
    # Leaders differ; difference of differences (0.5 - 0.1) - (0.1 - 0.6) = 0.9 over
    # sqrt(4 * 2 * 0.1² / 200) = 0.02: 45 standard errors.
    apart = {"A": record("A", [(0.5, 0.0), (0.1, 0.0)]), "B": record("B", [(0.1, 0.0), (0.6, 0.0)])}
    assert subspace_report.reading(apart) == (
        "The subspaces respond differently to different forgery families: subspace 0 "
        "separates most on A, subspace 1 on B, a difference of 45.0 standard errors.")
    noisy = {n: {**r, "subspaces": [{**s, "delta_fake_sd": 20.0, "delta_real_sd": 20.0}
                                    for s in r["subspaces"]]} for n, r in apart.items()}
    assert "0.2 standard errors, within noise" in subspace_report.reading(noisy)
    assert subspace_report.reading({"A": apart["A"]}).startswith("With one test set")
    # A set without fakes (its Δ fake is null once results.json is read back) is left out.
    no_fakes = {**record("C", [(None, 0.0), (None, 0.0)]), "num_fake": 0}
    assert subspace_report.reading({**apart, "C": no_fakes}) == subspace_report.reading(apart)
    assert subspace_report.reading({"C": no_fakes}).startswith("No test set holds both")
    assert "| subspace 0 | n/a / +0.000 · 0.700 |" in subspace_report.subspace_markdown(
        {"C": no_fakes})


def test_markdown_table_and_chart(tmp_path):
    table = {"SynBlend": record("SynBlend", [(0.5, 0.0), (0.1, -0.25), (0.0, 0.0)]),
             "Syn|Pipe": record("Syn|Pipe", [(0.1, 0.0), (0.6, 0.0), (0.2, 0.1)])}
    text = subspace_report.subspace_markdown(table)
    rows = [line for line in text.splitlines() if line.startswith("| subspace")]
    assert rows == ["| subspace 0 | +0.500 / +0.000 · 0.700 | +0.100 / +0.000 · 0.700 |",
                    "| subspace 1 | +0.100 / -0.250 · 0.710 | +0.600 / +0.000 · 0.710 |",
                    "| subspace 2 | +0.000 / +0.000 · 0.720 | +0.200 / +0.100 · 0.720 |"]
    assert "| | SynBlend | Syn\\|Pipe |" in text and "| all trained (AUC) | 0.800 | 0.800 |" in text
    assert text.rstrip().endswith(subspace_report.reading(table))
    path = subspace_report.plot_subspaces(table, tmp_path / "subspaces.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["subspaces.png"]  # no temporary left
    with pytest.raises(ValueError, match="at least one measured"):
        subspace_report.plot_subspaces({"A": {"dataset": "A", "skipped": "why"}}, tmp_path / "x")
    fig = subspace_report.subspace_figure(table)
    assert too_small(fig) == [] and overlapping_tick_labels(fig) == []
    nulls = {**table["SynBlend"], "trained_frame_auc": None,
             "subspaces": [{**s, "delta_fake": None} for s in table["SynBlend"]["subspaces"]]}
    subspace_report.plot_subspaces({"SynBlend": nulls}, tmp_path / "nulls.png")  # draws


def test_report_imports_no_jax():
    code = ("import sys, fmsd_jax.evaluators.subspace_report; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax') "
            "or m == 'matplotlib.pyplot'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
