"""End-to-end behaviour of the train / evaluate / export / predict modes on a tiny CLIP.

Runs that need a fresh process (SIGKILL, SIGTERM, 8 virtual devices, 2 processes) go through
`python -m fmsd_jax.main` exactly as a user runs it; the rest call the library in-process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import (
    assert_json_close,
    counting_compiles,
    flat_arrays,
    make_cfg,
    overrides,
    trainable_at,
    write_tiny_clip,
)

from fmsd_jax import atomic, errors, parallel
from fmsd_jax.evaluators import adaptation, calibration, scoring
from fmsd_jax.evaluators import operating_points as ops
from fmsd_jax.method import decompose as decomp
from fmsd_jax.modes import evaluate, export, mask, predict, train
from fmsd_jax.run import checkpoints, rebuild, train_step, workdir_files, workdir_lock

ROOT = Path(__file__).resolve().parents[1]


def cli_args(workdir: Path, ckpt: Path, bench: Path, *flags: str) -> list[str]:
    """The command line of a tiny training run, as a user types it."""
    args = [sys.executable, "-m", "fmsd_jax.main", "--config", "configs/clip_b16.py:runlocal",
            f"--workdir={workdir}"]
    return args + [f"--config.{k}={v}" for k, v in overrides(ckpt, bench).items()] + list(flags)


def cli(workdir: Path, ckpt: Path, bench: Path, *flags: str, env: dict | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    args = cli_args(workdir, ckpt, bench, *flags)
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def latest_step(workdir: Path) -> int:
    return max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_clip_checkpoint, tiny_benchmark):
    """One uninterrupted 6-step FMSD run, shared by the tests that only read it."""
    workdir = tmp_path_factory.mktemp("trained")
    cfg = make_cfg(tiny_clip_checkpoint, tiny_benchmark)
    lines = logging.getLogger("fmsd_jax")
    keep, level = _Lines(), lines.level
    lines.addHandler(keep)
    lines.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch:
            # how many XLA compiles each call made
            for module, name in ((scoring, "validate"), (evaluate, "evaluate")):
                patch.setattr(module, name, counting_compiles(getattr(module, name),
                                                              COMPILES_IN.setdefault(name, [])))
            results = train.train(cfg, workdir)
    finally:
        lines.removeHandler(keep)
        lines.setLevel(level)
    return cfg, workdir, results


class _Lines(logging.Handler):
    """The trained run's log lines, for the tests that read what it printed."""

    def emit(self, record: logging.LogRecord) -> None:
        LOG_LINES.append(record.getMessage())


LOG_LINES: list[str] = []


COMPILES_IN: dict[str, list[int]] = {}  # function name -> compiles during each of its calls


def test_the_log_shows_the_learning_rates_the_optimizer_uses(trained):
    cfg, _, _ = trained
    steps = [line for line in LOG_LINES if line.startswith("step ")]
    assert steps and all(" lr 0.0002 " in line and " head_lr 0.0002" in line for line in steps)
    assert (cfg.optim.lr, cfg.optim.head_lr) == (2e-4, 2e-4)


def test_the_steps_between_log_points_make_no_implicit_transfer(tmp_path, tiny_clip_checkpoint,
                                                                tiny_benchmark, monkeypatch):
    """The loop keeps the device busy: assembling a batch and the train step run under
    jax.transfer_guard('disallow'), so a host sync or an implicit copy inside would raise."""
    def guarded(fn):
        def call(*args, **kwargs):
            with jax.transfer_guard("disallow"):
                return fn(*args, **kwargs)
        return call

    real = train_step.assemble_step

    def assemble(*args, **kwargs):
        parts = real(*args, **kwargs)
        parts["step_fn"] = guarded(parts["step_fn"])
        return parts

    monkeypatch.setattr(train_step, "assemble_step", assemble)
    monkeypatch.setattr(parallel, "global_batch", guarded(parallel.global_batch))
    cfg = make_cfg(tiny_clip_checkpoint, tiny_benchmark, **{
        "train.total_steps": "4", "train.log_every": "4", "train.eval_every": "4",
        "train.eval_after_training": "False"})
    train.train(cfg, tmp_path)
    assert checkpoints.latest_saved_step(tmp_path) == 4


def test_the_eval_step_compiles_once_per_run(trained):
    """Every validation and the final evaluation reuse one compiled eval step (each built a
    new jax.jit, so each validation retraced and recompiled)."""
    assert len(COMPILES_IN["validate"]) == 2  # runlocal: steps 4 and 6
    assert COMPILES_IN["validate"][0] >= 1  # the first one compiles the step
    assert COMPILES_IN["validate"][1:] == [0]
    # The test sets and the validation calibration: the same program, the same shapes. The one
    # compile is the subspace ablation's undo merge (evaluators/subspaces.py: one program for
    # every k, outside the predict function, which scores every variant uncompiled again).
    assert COMPILES_IN["evaluate"] == [1]


def test_a_program_read_from_the_persistent_cache_counts_as_a_compile():
    """The suite runs with jax's persistent compilation cache (conftest.py); the compile counts
    above must still count a program a call had to obtain when it comes from that cache, or a
    recompile would pass as 'compiled once'."""
    import jax.numpy as jnp
    from jax._src import compilation_cache

    assert compilation_cache.is_persistent_cache_enabled()
    hits: list[str] = []
    jax.monitoring.register_event_listener(
        lambda event, **_: hits.append(event)
        if event == "/jax/compilation_cache/cache_hits" else None)
    x = jnp.arange(5.0)

    def retraced():  # a new jit each call: traced, lowered and compiled (or read) again
        return jax.jit(lambda v: jnp.cos(v) * 3.0 - 0.5)(x)

    calls: list[int] = []
    counting_compiles(retraced, calls)()
    jax.clear_caches()  # forget the executables in memory: the next one can only come from disk
    counting_compiles(retraced, calls)()
    assert len(hits) == 1  # the second program was read from the cache...
    assert calls == [1, 1]  # ...and counted as one compile, like the first


def test_train_writes_everything_a_user_reads(trained):
    cfg, workdir, results = trained
    for name in ("config.json", "layer_mask.json", "decomposition.json", "results.json",
                 "results.md", "roc.png", "layer_scores.png", "diagnostics.json",
                 "adaptation.png", "decision.json", "calibration.png"):
        assert (workdir / name).is_file(), name
    assert list((workdir / "tb").iterdir()), "no TensorBoard event file"
    saved = json.loads((workdir / "results.json").read_text())
    assert set(saved) == {"SynBlend", "SynUpsample"}
    # Each saved AUC is sklearn's AUC of the evaluated checkpoint's probabilities for that test
    # set, scored again here through the production scorer.
    from sklearn.metrics import roc_auc_score

    run = rebuild.open_run(cfg, workdir, parallel.make_mesh(cfg.mesh), estimate=False)
    trainable = rebuild.restore_trainable(cfg, workdir, run)
    for name, metrics in saved.items():
        assert {"frame_auc", "video_auc", "acc", "ap", "eer"} <= set(metrics)
        _, probs, labels = scoring.score_dataset(cfg, run, trainable, name, "test")
        assert len(probs) == metrics["num_frames"] and len(set(labels.tolist())) == 2
        np.testing.assert_allclose(metrics["frame_auc"], roc_auc_score(labels, probs),
                                   rtol=0, atol=1e-12, err_msg=name)
    # decision.json's temperature is the NLL fit on the validation split (never a test set),
    # and each test set's calibration and operating points are recomputed from its scores.
    rule = json.loads((workdir / "decision.json").read_text())
    val = scoring.score_split(cfg, run, trainable, "SynBlend", "val")
    t, _ = calibration.fit_temperature(val.logits(), val.arrays()[1])
    assert rule["temperature"] == t and rule["fitted_on"]["split"] == "val"
    for name, metrics in saved.items():
        acc = scoring.score_split(cfg, run, trainable, name, "test")
        probs, labels = acc.arrays()
        calibrated = calibration.probs_at(acc.logits(), t)
        c = metrics["calibration"]
        assert c["before"]["ece"] == pytest.approx(calibration.ece(probs, labels), abs=1e-12)
        assert c["after"]["ece"] == pytest.approx(calibration.ece(calibrated, labels), abs=1e-12)
        frame = metrics["operating_points"]["frame"]
        for point, threshold in rule["thresholds"]["frame"].items():
            assert frame[point]["threshold"] == threshold
            assert frame[point]["fpr"] == ops.rates_at(calibrated, labels, threshold)["fpr"]
        assert set(metrics["video_auc_by_aggregation"]) == {"mean", "mean_logit", "max",
                                                            "top4"}
        assert metrics["video_auc_by_aggregation"]["mean"] == metrics["video_auc"]
    mask = json.loads((workdir / "layer_mask.json").read_text())
    selected = np.asarray(mask["mask"])
    chex.assert_shape(selected, (2, 4))  # tiny tower: 2 layers x (q, k, v, out)
    assert selected.sum() == cfg.method.mask.top_k
    assert np.asarray(mask["score"]).shape == (2, 4)
    assert latest_step(workdir) == 6
    assert (workdir / "best").is_dir()


def test_masked_out_layers_keep_their_pretrained_factors(trained, tiny_clip_checkpoint):
    """Artifact factors of layers the mask left out are bit-identical to step 0's."""
    cfg, workdir, _ = trained
    mask = np.asarray(json.loads((workdir / "layer_mask.json").read_text())["mask"], bool)
    run = rebuild.open_run(cfg, workdir, parallel.make_mesh(cfg.mesh), estimate=False)
    initial = flat_arrays(run.trainable)
    final = trainable_at(workdir)
    targets = list(cfg.method.targets)
    checked = 0
    for key, before in initial.items():
        if "head" in key:
            continue
        target = next(t for t in targets if f"'{t}'" in key)
        for layer in range(before.shape[0]):
            same = np.array_equal(before[layer], final[key][layer])
            assert same == (not mask[layer, targets.index(target)]), (key, layer)
            checked += 1
    assert checked > 0


def test_diagnostics_measure_the_adapted_layers_and_the_contribution(trained):
    """Relative change exactly 0 where the mask left a layer out, > 0 where it trained; the
    contribution is against the pretrained backbone: a detector whose adapted layers are reset
    contributes exactly 0, and its reference really holds the pretrained factors."""
    cfg, workdir, _ = trained
    diag = json.loads((workdir / "diagnostics.json").read_text())
    mask = np.asarray(json.loads((workdir / "layer_mask.json").read_text())["mask"], bool)
    rel = np.asarray(diag["weight_change"]["relative"])
    assert np.all(rel[~mask] == 0.0) and np.all(rel[mask] > 0.0)
    # The diagnostics describe the checkpoint evaluation uses: the best one (validation ran at
    # steps 4 and 6), by its step.
    run = rebuild.open_run(cfg, workdir, parallel.make_mesh(cfg.mesh), estimate=False)
    _, step, which = rebuild.restore_for_eval(cfg, workdir, run)
    assert (diag["step"], diag["checkpoint"]) == (step, which) and which == "best"
    assert step in set(ocp.step.checkpoint_steps(workdir / "best"))
    c = diag["contribution"]
    np.testing.assert_allclose(c["frame_auc"], c["trained"]["frame_auc"]
                               - c["pretrained_backbone"]["frame_auc"], atol=1e-12)
    assert "Did the backbone adapt?" in (workdir / "results.md").read_text()

    initial = flat_arrays(run.trainable)
    trainable = rebuild.restore_trainable(cfg, workdir, run)
    reference = adaptation.pretrained_backbone(run, trainable)
    ref, got = flat_arrays(reference), flat_arrays(trainable)
    for key in initial:
        if "head" in key:  # the trained head is kept
            np.testing.assert_array_equal(ref[key], got[key])
        else:  # the backbone is back at the pretrained factors
            np.testing.assert_array_equal(ref[key], initial[key])
    assert any(not np.array_equal(got[k], initial[k]) for k in initial if "head" not in k)
    reset_ref = adaptation.pretrained_backbone(run, reference)
    zero, _ = adaptation.backbone_contribution(cfg, run, reference, reset_ref)
    assert zero["frame_auc"] == 0.0 and zero["video_auc"] == 0.0 and zero["within_noise"]


@pytest.mark.parametrize("name,trains", [("effort_b16", "artifact"), ("full_ft_b16", "all"),
                                         ("linear_probe_b16", "head")])
def test_baseline_configs_run_through_the_same_code(tmp_path, tiny_clip_checkpoint,
                                                    tiny_benchmark, name, trains):
    cfg = make_cfg(tiny_clip_checkpoint, tiny_benchmark, name, **{"train.total_steps": "2"})
    results = train.train(cfg, tmp_path)
    assert set(results) == {"SynBlend", "SynUpsample"}
    keys = list(trainable_at(tmp_path))
    diag = json.loads((tmp_path / "diagnostics.json").read_text())
    rel = np.asarray(diag["weight_change"]["relative"])
    if trains == "head":
        assert all("head" in k for k in keys)
        assert diag["contribution"] is None and "frozen" in diag["contribution_note"]
        assert not rel.any() and diag["head_change"] > 0
    elif trains == "artifact":
        assert any("head" in k for k in keys)
        assert not any("kernel" in k for k in keys if "head" not in k)
        assert not (tmp_path / "layer_mask.json").exists()  # Effort: no masking
    else:
        assert any("mlp" in k for k in keys) and any("patch_embed" in k for k in keys)
    if trains != "head":  # every candidate cell trains in Effort and full fine-tuning
        assert np.all(rel > 0) and diag["contribution"]["num_frames"] > 0
    assert evaluate.evaluate(cfg, tmp_path) == results  # rebuilt from the checkpoint's record


def test_a_restored_train_state_runs_the_compiled_step_without_recompiling(trained):
    """What orbax gives back on resume is a TrainState with the pytree type, shardings and
    committedness of the state the step was compiled for, so resuming never recompiles it."""
    cfg, workdir, _ = trained
    mesh = parallel.make_mesh(cfg.mesh)
    run = rebuild.open_run(cfg, workdir, mesh, estimate=False)
    parts = train_step.assemble_step(cfg, run, 6)
    abstract = parallel.abstract_tree(mesh, parts["state"])
    size = cfg.model.image_size
    batch = parallel.global_batch(mesh, {
        "image": np.zeros((cfg.train.batch_size, size, size, 3), np.uint8),
        "label": np.zeros((cfg.train.batch_size,), np.int32)}, ("image", "label"))
    compiles: list[int] = []
    step = counting_compiles(parts["step_fn"], compiles)
    _, sums = step(parts["state"], run.frozen, batch, parts["metric_sums"])
    ckpts = checkpoints.RunCheckpoints(workdir)
    try:
        restored = ckpts.restore_latest(abstract, None)
    finally:
        ckpts.close()
    assert type(restored) is train_step.TrainState and int(restored.step) == 6
    out, _ = step(restored, run.frozen, batch, train_step.zero_metric_sums(sums.keys(), mesh))
    assert compiles[0] >= 1 and compiles[1:] == [0]
    assert int(out.step) == 7


def no_svd(monkeypatch) -> None:
    """From here on any SVD fails the test: the decomposition's jitted one, decompose() itself
    and jnp's (a spy on the Python functions: a cached jit would not call jnp's again)."""
    def boom(*_args, **_kwargs):
        raise AssertionError("an SVD ran")

    monkeypatch.setattr(decomp, "_svd_tail", boom)
    monkeypatch.setattr(decomp, "decompose", boom)
    monkeypatch.setattr(jax.numpy.linalg, "svd", boom)


def test_a_restore_runs_no_svd_and_scores_exactly_as_the_svd_rebuild(trained, monkeypatch):
    """The run rebuilt from the checkpoint's record (no SVD) equals, bit for bit, the one every
    restore used to build (the mask from layer_mask.json, a new SVD of the pretrained weights),
    and so do the scores of every test frame."""
    cfg, workdir, _ = trained
    mesh = parallel.make_mesh(cfg.mesh)
    with monkeypatch.context() as before:  # the checkpoint's record ignored: the old path
        before.setattr(rebuild, "_checkpoint_record", lambda *_a, **_k: None)
        by_svd = rebuild.open_run(cfg, workdir, mesh, estimate=False)
        svd_trainable = rebuild.restore_trainable(cfg, workdir, by_svd)
    no_svd(monkeypatch)
    run = rebuild.open_run(cfg, workdir, mesh, estimate=False)
    trainable = rebuild.restore_trainable(cfg, workdir, run)
    assert run.spec == by_svd.spec
    np.testing.assert_array_equal(run.mask, by_svd.mask)
    for new, old in ((run.frozen, by_svd.frozen), (trainable, svd_trainable),
                     (run.trainable, by_svd.trainable)):
        new, old = flat_arrays(new), flat_arrays(old)
        assert new.keys() == old.keys()
        assert [k for k in new if not np.array_equal(new[k], old[k])] == []
    assert any("semantic" in k for k in flat_arrays(run.frozen))
    for name in cfg.data.test_dataset:
        _, probs, _ = scoring.score_dataset(cfg, run, trainable, name, "test")
        _, svd_probs, _ = scoring.score_dataset(cfg, by_svd, svd_trainable, name, "test")
        assert len(probs) == 8 and np.array_equal(probs, svd_probs), name


def test_checkpoints_hold_their_record_and_best_holds_the_trained_leaves_only(trained):
    cfg, workdir, _ = trained
    record_items = {"layer_mask", "decomposition", "reference"}
    steps = sorted(p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert [p.name for p in steps] == ["4", "6"]
    for step in steps:
        assert {p.name for p in step.iterdir() if p.is_dir()} == {"state", "data", *record_items}
    (best,) = [p for p in (workdir / "best").iterdir() if p.name.isdigit()]
    assert {p.name for p in best.iterdir() if p.is_dir()} == {"trainable", "metrics",
                                                              *record_items}
    saved = ocp.StandardCheckpointer().metadata(best / "trainable").item_metadata.tree
    assert set(flat_arrays(saved)) == set(trainable_at(workdir))  # no optimizer state
    ckpts = checkpoints.RunCheckpoints(workdir)
    try:
        which, step, record = ckpts.read_record(for_eval=True)
    finally:
        ckpts.close()
    assert (which, step) == ("best", int(best.name))
    mask = json.loads((workdir / "layer_mask.json").read_text())["mask"]
    np.testing.assert_array_equal(record.mask, np.asarray(mask, np.float32))
    assert record.spec == json.loads((workdir / "decomposition.json").read_text())
    assert set(record.reference) == set(cfg.method.targets)
    chex.assert_shape(record.reference["q"]["u0"], (2, 32, 4))  # (layers, in, K·d): small


def test_evaluate_export_and_predict_read_no_svd_and_no_optimizer_state(
        trained_copy, tmp_path, tiny_benchmark, monkeypatch):
    cfg, workdir, _ = trained_copy
    results = (workdir / "results.json").read_bytes()
    requested: list[dict] = []
    real_restore = ocp.CheckpointManager.restore

    def restore(self, step, args=None, **kwargs):
        requested.append(dict(args.items()))
        return real_restore(self, step, args=args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
    no_svd(monkeypatch)
    evaluate.evaluate(cfg, workdir)
    assert (workdir / "results.json").read_bytes() == results
    export.export(cfg, workdir, tmp_path / "export")
    folder = tiny_benchmark / "SynBlend" / "fake" / "frames" / "test_0000"
    predict.predict(cfg, workdir, [str(folder)], tmp_path / "p.json")
    assert requested and all("state" not in items for items in requested)
    shutil.rmtree(workdir / "best")  # no best: evaluation reads the latest training checkpoint
    requested.clear()
    run = rebuild.open_run(cfg, workdir, parallel.make_mesh(cfg.mesh), estimate=False)
    trainable, step, which = rebuild.restore_for_eval(cfg, workdir, run)
    assert (step, which) == (6, "latest")
    got, want = flat_arrays(trainable), trainable_at(workdir, 6)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    state_reads = [items["state"] for items in requested if "state" in items]
    assert len(state_reads) == 1 and state_reads[0].partial_restore
    assert set(state_reads[0].item) == {"trainable"}  # the moments stay on disk


def test_mode_mask_on_a_trained_workdir_cannot_change_what_its_checkpoints_evaluate_as(
        trained_copy, tmp_path, tiny_benchmark, caplog):
    """--mode mask refuses there; and a layer_mask.json replaced anyway (its checkpoints moved
    aside while --mode mask ran under other settings, as a version that did not refuse would
    have done) and decomposition.json deleted change neither results.json nor any score."""
    cfg, workdir, _ = trained_copy
    results = (workdir / "results.json").read_bytes()
    folder = str(tiny_benchmark / "SynBlend" / "fake" / "frames" / "test_0000")
    before = predict.predict(cfg, workdir, [folder], tmp_path / "before.json")["inputs"]
    with pytest.raises(errors.AlreadyExists, match="they keep their own copy"):
        mask.mask_only(cfg, workdir)
    aside = tmp_path / "aside"
    aside.mkdir()
    for name in ("checkpoints", "best"):
        (workdir / name).rename(aside / name)
    other = make_cfg(cfg.model.init_from, tiny_benchmark, **{"method.mask.top_k": "5"})
    new_mask = mask.mask_only(other, workdir)
    for name in ("checkpoints", "best"):
        (aside / name).rename(workdir / name)
    trained_mask = rebuild.open_run(cfg, workdir, parallel.make_mesh(cfg.mesh),
                                    estimate=False).mask
    assert new_mask.sum() == 5 and trained_mask.sum() == 2
    assert np.asarray(json.loads((workdir / "layer_mask.json").read_text())["mask"]).sum() == 5
    (workdir / "decomposition.json").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="fmsd_jax"):
        evaluate.evaluate(cfg, workdir)
    assert (workdir / "results.json").read_bytes() == results
    assert "layer_mask.json does not show the layer mask checkpoint" in caplog.text
    after = predict.predict(cfg, workdir, [folder], tmp_path / "after.json")["inputs"]
    assert after == before
    assert not (workdir / "decomposition.json").exists()  # modes that only read write none
    resumed = rebuild.open_run(cfg, workdir, parallel.make_mesh(cfg.mesh))  # as training resumes
    np.testing.assert_array_equal(resumed.mask, trained_mask)


def as_before_records(workdir: Path) -> None:
    """WORKDIR as the code before checkpoint records left it: no record items in any step,
    and best/ holding the whole train state (optimizer state included) under `state`."""
    for step in (workdir / "checkpoints").iterdir():
        for item in ("layer_mask", "decomposition", "reference"):
            shutil.rmtree(step / item)
    (best,) = [p for p in (workdir / "best").iterdir() if p.name.isdigit()]
    for item in ("trainable", "layer_mask", "decomposition", "reference"):
        shutil.rmtree(best / item)
    shutil.copytree(workdir / "checkpoints" / best.name / "state", best / "state")


def test_checkpoints_from_before_records_restore_the_old_way_and_resume(
        trained_copy, tiny_benchmark, caplog):
    cfg, workdir, _ = trained_copy
    results = (workdir / "results.json").read_bytes()
    as_before_records(workdir)
    with caplog.at_level("WARNING", logger="fmsd_jax"):
        evaluate.evaluate(cfg, workdir)
    assert (workdir / "results.json").read_bytes() == results
    old_way = [r.getMessage() for r in caplog.records if "predates" in r.getMessage()]
    (best,) = [p for p in (workdir / "best").iterdir() if p.name.isdigit()]
    assert old_way == [f"checkpoint {best} predates checkpoints that hold "
                       "their layer mask and decomposition: rebuilding it as before, from "
                       "layer_mask.json and an SVD of the pretrained weights"]
    longer = make_cfg(cfg.model.init_from, tiny_benchmark, **{"train.total_steps": "8"})
    train.train(longer, workdir)  # resumes from the old step 6, writes step 8 with its record
    assert latest_step(workdir) == 8
    items = {p.name for p in (workdir / "checkpoints" / "8").iterdir() if p.is_dir()}
    assert {"layer_mask", "decomposition", "reference", "state"} <= items


def test_a_config_that_does_not_fit_the_checkpoint_is_one_line(trained_copy, tiny_benchmark,
                                                               tmp_path):
    cfg, workdir, _ = trained_copy
    (best,) = [p for p in (workdir / "best").iterdir() if p.name.isdigit()]
    # Another CLIP of the same geometry: every shape fits, the weights are not the run's.
    other = write_tiny_clip(tmp_path / "other", seed=8)
    with pytest.raises(errors.BadInput, match=re.escape(
            f"config.model.init_from='{other}' does not fit checkpoint {best} (q: these are "
            "not the weights the reference was taken from")):
        evaluate.evaluate(make_cfg(other, tiny_benchmark), workdir)
    same_shapes = make_cfg(cfg.model.init_from, tiny_benchmark, **{
        "method.num_subspaces": "2", "method.rank": "2"})  # K·d = 4 as trained: orbax would
    with pytest.raises(errors.BadInput, match=re.escape(  # restore it without complaint
            f"checkpoint {best} was decomposed with targets=['q', 'k', 'v', 'out'], "
            "num_subspaces=4, rank=1; the config asks for targets=['q', 'k', 'v', 'out'], "
            "num_subspaces=2, rank=2; use the run's own config "
            f"({workdir / 'config.json'})")):
        evaluate.evaluate(same_shapes, workdir)
    probe = make_cfg(cfg.model.init_from, tiny_benchmark, "linear_probe_b16")
    with pytest.raises(errors.BadInput, match=re.escape(
            f"checkpoint {best} holds a decomposition, but config.method.regime="
            "'linear_probe' uses none")):
        evaluate.evaluate(probe, workdir)
    run = rebuild.open_run(cfg, workdir, parallel.make_mesh(cfg.mesh), estimate=False)
    other = checkpoints.RunRecord(1.0 - run.mask, run.spec.to_dict(), None)
    ckpts = checkpoints.RunCheckpoints(workdir)
    try:
        with pytest.raises(errors.BadInput, match=re.escape(
                f"checkpoint {best} holds another layer mask or decomposition than the one "
                "read from this workdir a moment earlier")):
            ckpts.restore_for_eval(parallel.abstract_tree(run.mesh, run.trainable),
                                   expect=other)
    finally:
        ckpts.close()


def test_evaluate_mode_rewrites_results_from_the_checkpoint(trained, tmp_path):
    cfg, workdir, results = trained
    before = json.loads((workdir / "results.json").read_text())
    (workdir / "results.json").unlink()
    again = evaluate.evaluate(cfg, workdir)
    after = json.loads((workdir / "results.json").read_text())
    assert after == before
    np.testing.assert_allclose(again["SynBlend"]["frame_auc"], results["SynBlend"]["frame_auc"])


def test_export_loads_in_transformers_with_identical_logits(trained, tmp_path, tiny_benchmark):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from flax import nnx
    from safetensors.torch import load_file

    cfg, workdir, _ = trained
    out = export.export(cfg, workdir, tmp_path / "export")
    run = rebuild.open_run(cfg, workdir, parallel.make_mesh(cfg.mesh), estimate=False)
    trainable = rebuild.restore_trainable(cfg, workdir, run)
    ours = nnx.merge(run.graphdef, trainable, run.frozen)
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    want = np.asarray(ours(images))

    model = transformers.CLIPVisionModel.from_pretrained(out).eval()
    head = torch.nn.Linear(model.config.hidden_size, 2)
    head.load_state_dict(load_file(out / "head.safetensors"))
    with torch.no_grad():
        pooled = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).pooler_output
        got = head(pooled).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    # The run's calibration travels with the export: P(fake) = softmax(logits / T)[1].
    meta = json.loads((out / "detector.json").read_text())
    assert json.loads((out / "decision.json").read_text()) == \
        json.loads((workdir / "decision.json").read_text())
    assert meta["temperature"] == json.loads((workdir / "decision.json").read_text())[
        "temperature"] and meta["decision"] == "decision.json"


def test_predict_scores_frames_folders_and_videos(trained, tiny_benchmark, tmp_path):
    cv2 = pytest.importorskip("cv2")
    cfg, workdir, _ = trained
    folder = tiny_benchmark / "SynBlend" / "fake" / "frames" / "test_0000"
    frames = sorted(folder.glob("*.png"))
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5, (32, 32))
    for f in frames * 2:
        writer.write(cv2.imread(str(f)))
    writer.release()
    # The synthetic frames hold no face: their centre squares are scored, and counted.
    centre = make_cfg(cfg.model.init_from, tiny_benchmark, **{"data.face.if_none": "centre"})
    result = predict.predict(centre, workdir, [str(folder), str(frames[0]), str(video)],
                             tmp_path / "pred.json")
    scored = result["inputs"]
    assert scored[str(video)]["frames_without_face"] == 2 * len(frames)
    assert "frames_without_face" not in scored[str(folder)]
    assert scored[str(folder)]["frames"] == len(frames)
    assert scored[str(frames[0])]["frames"] == 1
    assert scored[str(video)]["frames"] == 2 * len(frames)
    for r in scored.values():
        np.testing.assert_allclose(r["prob_fake"], np.mean(r["frame_probs"]), rtol=1e-6)
    # A frame's probability is the trained detector's softmax on its pixels (32 px: no resize)
    # at the run's validation temperature.
    from flax import nnx

    from fmsd_jax.data.transforms import read_rgb

    run = rebuild.open_run(cfg, workdir, parallel.make_mesh(cfg.mesh), estimate=False)
    model = nnx.merge(run.graphdef, rebuild.restore_trainable(cfg, workdir, run), run.frozen)
    pixels = read_rgb(str(frames[0]))
    assert pixels.shape == (32, 32, 3)
    logits = np.asarray(model(pixels[None]), np.float64)[0]
    t = json.loads((workdir / "decision.json").read_text())["temperature"]
    assert result["temperature"] == t and t != 1.0
    np.testing.assert_allclose(scored[str(frames[0])]["prob_fake"],
                               np.exp(logits[1] / t) / np.exp(logits / t).sum(), atol=1e-6)
    np.testing.assert_allclose(scored[str(frames[0])]["frame_logits"][0], logits[1] - logits[0],
                               atol=1e-5)
    # The single frame scores the same alone as inside its folder.
    np.testing.assert_allclose(scored[str(frames[0])]["prob_fake"],
                               scored[str(folder)]["frame_probs"][0], atol=1e-6)
    assert json.loads((tmp_path / "pred.json").read_text())["inputs"].keys() == scored.keys()


def wait_for_lock_holder(path: Path, proc: subprocess.Popen, timeout: float = 240) -> dict:
    """The holder record `proc` writes into its workdir lock once it holds it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holder = workdir_lock.read_holder(path)
        if holder and holder["pid"] == proc.pid:
            return holder
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    raise AssertionError(f"{proc.args} never locked {path}")


@pytest.mark.slow
def test_sigkill_then_resume_equals_the_uninterrupted_run(trained, tmp_path,
                                                          tiny_clip_checkpoint, tiny_benchmark):
    """Killed after step 3 (checkpoint at 2), resumed: same data order, same final state.

    While the first run holds the workdir, a second command on it is refused at once, in one
    line naming the first's pid (the first is stopped meanwhile, so the two cannot race); after
    the kill -9 the resumed run is not refused: the lock died with its process."""
    _, reference, _ = trained
    args = cli_args(tmp_path, tiny_clip_checkpoint, tiny_benchmark,
                    "--config.train.fault_after_step=3")
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        wait_for_lock_holder(tmp_path / ".lock", first)
        os.kill(first.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        second = cli(tmp_path, tiny_clip_checkpoint, tiny_benchmark, check=False,
                     env={"JAX_PLATFORMS": "cpu"})
        refused_in = time.monotonic() - t0
        os.kill(first.pid, signal.SIGCONT)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert second.stderr.count("\n") == 1, second.stderr
        assert second.stderr.startswith(f"error: {tmp_path} is in use by pid {first.pid} on "
                                        f"{socket.gethostname()} (mode train, started ")
        assert "wait for it or use another --workdir" in second.stderr
        assert "data checked" not in second.stdout  # refused before reading anything
        print(f"second run refused in {refused_in:.1f}s")
        out = first.communicate(timeout=300)[0]
        assert first.returncode == -9, out[-2000:]
    finally:
        first.kill()
        first.communicate()
    assert latest_step(tmp_path) == 2
    cli(tmp_path, tiny_clip_checkpoint, tiny_benchmark)
    want, got = trainable_at(reference), trainable_at(tmp_path)
    assert want.keys() == got.keys()
    for key in want:
        # Same data order and optimizer state: equal up to float rounding (the reference ran
        # in-process, the resumed run through the CLI; XLA may order a reduction differently).
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_a_resumed_run_scores_the_step_whose_best_save_was_lost(trained_copy, monkeypatch):
    """Stopped after step 6's latest save but before its best save finished (killed, disk
    full): the rerun validates step 6 again, or it would choose among the earlier steps only."""
    cfg, workdir, _ = trained_copy
    shutil.rmtree(workdir / "best")
    scored = []
    validate = scoring.validate
    monkeypatch.setattr(scoring, "validate", lambda *a: scored.append(1) or validate(*a))
    train.train(cfg, workdir)
    assert scored == [1]
    assert list(ocp.step.checkpoint_steps(workdir / "best")) == [6]


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path, tiny_clip_checkpoint, tiny_benchmark):
    proc = cli(tmp_path, tiny_clip_checkpoint, tiny_benchmark,
               "--config.train.fault_after_step=3", "--config.train.fault_signal=SIGTERM")
    assert latest_step(tmp_path) == 3
    assert "SIGTERM received" in proc.stdout + proc.stderr
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_clip_checkpoint,
                                                           tiny_benchmark):
    cfg = make_cfg(tiny_clip_checkpoint, tiny_benchmark, **{"train.total_steps": "2"})
    train.train(cfg, tmp_path)
    good = trainable_at(tmp_path, 2)
    bad = make_cfg(tiny_clip_checkpoint, tiny_benchmark, **{"optim.lr": "1e30",
                                                            "optim.head_lr": "1e30"})
    # The run diverging later under its own settings: its config.json is the diverging one
    # (resuming under a changed lr is refused; tests/test_cli_errors.py).
    atomic.write_json(tmp_path / workdir_files.CONFIG_JSON, bad.to_dict())
    with pytest.raises(FloatingPointError, match="last good checkpoint was kept"):
        train.train(bad, tmp_path)
    assert latest_step(tmp_path) == 2
    for key, value in trainable_at(tmp_path, 2).items():
        np.testing.assert_array_equal(value, good[key])


def test_clear_errors_before_any_step_is_compiled(tmp_path, tiny_clip_checkpoint,
                                                  tiny_benchmark, monkeypatch):
    """A missing checkpoint and an empty training set fail before XLA compiles anything; a
    geometry mismatch is found once the checkpoint is read (its eager weight conversions
    compile small programs), still before the train step is built."""
    compiles: list[int] = []
    built: list[int] = []
    assemble_step = train_step.assemble_step
    monkeypatch.setattr(train_step, "assemble_step",
                        lambda *a, **k: built.append(1) or assemble_step(*a, **k))
    run = counting_compiles(train.train, compiles)
    missing = make_cfg(tmp_path / "nope.safetensors", tiny_benchmark)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        run(missing, tmp_path / "a")
    geometry = make_cfg(tiny_clip_checkpoint, tiny_benchmark, **{"model.variant": "B/16"})
    with pytest.raises(ValueError, match=r"width: config 768 vs checkpoint 32"):
        run(geometry, tmp_path / "b")
    empty_json = tmp_path / "json"
    empty_json.mkdir()
    (empty_json / "Empty.json").write_text(json.dumps(
        {"Empty": {"FF-real": {"train": {}, "val": {}, "test": {}}}}))
    empty = make_cfg(tiny_clip_checkpoint, tiny_benchmark, **{
        "data.dataset_json_folder": str(empty_json), "data.train_dataset": "('Empty',)"})
    with pytest.raises(ValueError, match="Empty"):
        run(empty, tmp_path / "c")
    assert compiles[0] == compiles[2] == 0 and len(compiles) == 3, compiles
    assert built == []


def test_cli_rejects_unknown_config_fields(tmp_path, tiny_clip_checkpoint, tiny_benchmark):
    proc = cli(tmp_path, tiny_clip_checkpoint, tiny_benchmark, "--config.train.batch_sz=4",
               check=False)
    assert proc.returncode != 0
    assert "--config.train.batch_sz" in proc.stderr and "batch_size" in proc.stderr


# Holds the config, run.json, the layer mask and its plot (~90 KiB) and checkpoint 2 (~240 KiB),
# not checkpoint 4 as well: the disk fills during step 4's saves (latest or best, whichever
# orbax's threads write first).
SMALL_DISK = "450k"


@contextlib.contextmanager
def small_disk(path: Path) -> Iterator[bool]:
    """A tmpfs of SMALL_DISK at `path`; False where mounting is refused (not root)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK}", "tmpfs",
                              str(path)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(path)], check=True)


@pytest.mark.slow
def test_a_full_disk_mid_checkpoint_is_one_line_and_the_moved_workdir_resumes(
        trained, tmp_path, tiny_clip_checkpoint, tiny_benchmark):
    """The workdir on a tmpfs too small for the run (else the write hook, where mounting is
    refused): exit 2, one line naming the file and the space left; copied to the real disk,
    the same command resumes to the uninterrupted run's weights and results."""
    _, reference, _ = trained
    disk, moved = tmp_path / "small", tmp_path / "moved"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # no accelerator probing on stderr
    with small_disk(disk) as mounted:
        workdir = disk / "run"
        args = cli_args(workdir, tiny_clip_checkpoint, tiny_benchmark)
        if not mounted:  # the same run, its Python writes into step 4's checkpoint failing
            args[1:3] = [str(ROOT / "tests" / "enospc_hook.py")]
            env["ENOSPC_AT"] = "4.orbax-checkpoint-tmp"
        full = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=env)
        assert full.returncode == 2, full.stdout[-3000:] + full.stderr[-3000:]
        assert full.stderr.count("\n") == 1, full.stderr
        assert "Traceback" not in full.stdout + full.stderr
        assert re.fullmatch(
            rf"error: no space left on device writing {workdir}/(checkpoints|best)/4\S+ "
            r"\(\S+ \S+ free on /\S*\): free space or move the workdir, then rerun the same "
            r"command \(a training run resumes from its last finalized checkpoint\)\n",
            full.stderr)
        if mounted:
            assert f" free on {disk})" in full.stderr
        # Step 4's unfinished saves are orbax temporaries, not checkpoints; the last finalized
        # one (2 on this disk; 4 only if its best save failed after its latest save finished)
        # restores.
        step = checkpoints.latest_saved_step(workdir)
        assert step in (2, 4)
        trainable_at(workdir, step)
        shutil.copytree(workdir, moved)
    cli(moved, tiny_clip_checkpoint, tiny_benchmark)  # the same command, on a larger disk
    want, got = trainable_at(reference), trainable_at(moved)
    assert want.keys() == got.keys()
    for key in want:  # as in test_sigkill_then_resume_equals_the_uninterrupted_run
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
    results = [json.loads((d / "results.json").read_text()) for d in (reference, moved)]
    assert_json_close(results[1], results[0], atol=1e-6)


MULTI_DEVICE_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
sys.path.insert(0, {tests!r})
from conftest import make_cfg, trainable_at
from fmsd_jax.modes import train
from pathlib import Path
ckpt, bench, out = Path({ckpt!r}), Path({bench!r}), Path({out!r})
assert jax.device_count() == 8
for name, mesh in (("data8", {{}}), ("fsdp2", {{"mesh.fsdp": "2"}})):
    cfg = make_cfg(ckpt, bench, **{{"train.batch_size": "8", "train.total_steps": "3",
                                   "train.eval_every": "3", **mesh}})
    train.train(cfg, out / name)
try:
    bad = make_cfg(ckpt, bench, **{{"train.batch_size": "6"}})
    train.train(bad, out / "bad")
except ValueError as e:
    print("BATCH_ERROR", e)
"""


@pytest.mark.slow
def test_eight_devices_match_one_device(tmp_path, tiny_clip_checkpoint, tiny_benchmark):
    """Data-parallel over 8 virtual CPU devices (and data 4 x fsdp 2) = one device, to 1e-5."""
    script = MULTI_DEVICE_SCRIPT.format(tests=str(ROOT / "tests"), ckpt=str(tiny_clip_checkpoint),
                                        bench=str(tiny_benchmark), out=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "config.train.batch_size=6 is not divisible by the 8 devices" in proc.stdout
    cfg = make_cfg(tiny_clip_checkpoint, tiny_benchmark, **{
        "train.batch_size": "8", "train.total_steps": "3", "train.eval_every": "3"})
    train.train(cfg, tmp_path / "one")
    want = trainable_at(tmp_path / "one")
    for name in ("data8", "fsdp2"):
        got = trainable_at(tmp_path / name)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=1e-5,
                                       err_msg=f"{name} {key}")
        one = json.loads((tmp_path / "one" / "results.json").read_text())
        many = json.loads((tmp_path / name / "results.json").read_text())
        np.testing.assert_allclose(many["SynBlend"]["frame_auc"], one["SynBlend"]["frame_auc"],
                                   atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(workdir: Path, ckpt: Path, bench: Path, *flags: str,
                  timeout: float = 240) -> tuple[list[subprocess.Popen], list[str]]:
    """Both processes of one two-process run on localhost, and their outputs; each exited 0."""
    base = cli_args(workdir, ckpt, bench, "--config.multihost=True",
                    f"--config.distributed.coordinator_address=127.0.0.1:{_free_port()}",
                    "--config.distributed.num_processes=2", *flags)
    procs = [subprocess.Popen(base + [f"--config.distributed.process_id={i}"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:  # a hang (e.g. processes waiting in different save barriers) fails, not stalls
        for p in procs:
            p.kill()
            p.communicate()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return procs, outs


@pytest.mark.slow
def test_two_processes_on_localhost_train_checkpoint_and_share_a_preemption(
        tmp_path, tiny_clip_checkpoint, tiny_benchmark):
    """Two processes train and evaluate as one run. Then a second run whose process 1 alone
    gets SIGTERM after step 1 (checkpoints only every 4 steps): both processes save the same
    step, the one JAX's preemption sync manager picks, and exit; the same command again
    resumes there and ends bit-identical to the uninterrupted run. With a flag local to each
    process, process 1 would save step 1 alone and wait in orbax's save barrier forever."""
    whole = tmp_path / "whole"
    procs, _ = two_processes(whole, tiny_clip_checkpoint, tiny_benchmark,
                             "--config.train.total_steps=4")
    # One run's processes do not refuse one another: each locked a file of its own.
    for i, p in enumerate(procs):
        holder = workdir_lock.read_holder(workdir_lock.lock_path(whole, i))
        assert (holder["pid"], holder["process"]) == (p.pid, i)
    assert latest_step(whole) == 4
    results = json.loads((whole / "results.json").read_text())
    # Metrics cover every test frame, gathered from both processes (2 videos x 2 groups x 2).
    assert results["SynBlend"]["num_frames"] == 8

    cut = tmp_path / "preempted"
    cut.mkdir()  # with the mask estimated already, as after --mode mask (saves its estimate)
    shutil.copy(whole / workdir_files.MASK_JSON, cut / workdir_files.MASK_JSON)
    t0 = time.monotonic()
    _, outs = two_processes(cut, tiny_clip_checkpoint, tiny_benchmark,
                            "--config.train.total_steps=4", "--config.train.checkpoint_every=4",
                            "--config.train.fault_after_step=1",
                            "--config.train.fault_signal=SIGTERM",
                            "--config.train.fault_process=1")
    print(f"preempted pair took {time.monotonic() - t0:.1f}s")
    assert "SIGTERM caught" in outs[1] and "SIGTERM caught" not in outs[0]  # JAX's notifier
    saved = [re.findall(r"SIGTERM received by one of the 2 processes: saved step (\d+)", out)
             for out in outs]
    assert saved[0] == saved[1] and len(saved[0]) == 1, saved
    step = int(saved[0][0])
    # Step 2: process 0 had passed step 1 and waits in step 2's metrics fetch for process 1.
    assert step == 2, outs
    assert list(ocp.step.checkpoint_steps(cut / "checkpoints")) == [step]
    assert not (cut / "results.json").exists()

    _, outs = two_processes(cut, tiny_clip_checkpoint, tiny_benchmark,
                            "--config.train.total_steps=4")
    assert all(f"resumed from step {step}" in out for out in outs)
    want, got = trainable_at(whole), trainable_at(cut)
    assert want.keys() == got.keys()
    for key in want:  # the same processes, programs and data order: equal to the bit
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    resumed = json.loads((cut / "results.json").read_text())
    for name in ("SynBlend", "SynUpsample"):
        assert resumed[name] == results[name], name


# ---------------------------------------------------------------------------------------------
# Run manifest, determinism, predict for people (issue 12)


@pytest.fixture
def trained_copy(trained, tmp_path):
    """The trained workdir, copied, for tests that write into a workdir."""
    cfg, workdir, results = trained
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    return cfg, copy, results


def test_modes_that_read_a_run_replace_nothing_it_needs(trained_copy, tmp_path,
                                                        tiny_clip_checkpoint):
    cfg, workdir, _ = trained_copy
    spec = workdir / workdir_files.SPEC_JSON
    before = spec.stat().st_mtime_ns
    atomic.forget_written()
    out = export.export(cfg, workdir, tmp_path / "export")
    assert spec.stat().st_mtime_ns == before  # only training writes the decomposition
    names = {"model.safetensors", "config.json", "head.safetensors", "detector.json",
             "decision.json"}
    assert atomic.written() == {out / n: False for n in names}
    atomic.forget_written()
    export.export(cfg, workdir, out)  # an earlier export of this same workdir is replaced
    assert atomic.written() == {out / n: True for n in names}
    pretrained = tiny_clip_checkpoint.parent
    weights = (pretrained / "model.safetensors").read_bytes()
    with pytest.raises(errors.AlreadyExists, match=r"holds files that are not an export of .*"
                                                   r"\(no detector.json\)"):
        export.export(cfg, workdir, pretrained)  # a CLIP checkpoint's folder, by mistake
    assert (pretrained / "model.safetensors").read_bytes() == weights
    saved_mask = (workdir / workdir_files.MASK_JSON).read_bytes()
    with pytest.raises(errors.AlreadyExists, match="checkpoints trained under its "
                                                   "layer_mask.json"):
        mask.mask_only(cfg, workdir)
    assert (workdir / workdir_files.MASK_JSON).read_bytes() == saved_mask
    atomic.forget_written()
    best = next((workdir / "best").iterdir())
    shutil.rmtree(best / "trainable")  # a copy that lost some files
    with pytest.raises(errors.BadInput, match=rf"checkpoint {best} cannot be restored "
                                              r"\(KeyError.*\); it is damaged"):
        export.export(cfg, workdir, tmp_path / "export2")


def test_run_manifest_pins_command_code_devices_and_data(trained):
    cfg, workdir, _ = trained
    run = json.loads((workdir / "run.json").read_text())["train"]
    assert run["mode"] == "train" and run["command"]
    assert {"jax", "flax", "optax", "numpy"} <= set(run["packages"])
    assert run["devices"]["backend"] == "cpu" and run["devices"]["count"] == jax.device_count()
    git = run["git"]
    assert git is None or len(git["commit"]) == 40
    assert set(run["data"]) == {"SynBlend/train", "SynBlend/val", "SynBlend/test",
                                "SynUpsample/test"}
    for info in run["data"].values():
        assert len(info["sha256"]) == 64 and info["frames"] > 0
    assert len({info["sha256"] for info in run["data"].values()}) == 4
    md = (workdir / "results.md").read_text()
    assert "run.json" in md and run["data"]["SynBlend/test"]["sha256"][:12] in md


def test_evaluate_warns_when_the_data_changed_since_training(trained_copy, tmp_path, caplog,
                                                             tiny_benchmark):
    cfg, workdir, _ = trained_copy
    json_dir = tmp_path / "json"
    shutil.copytree(tiny_benchmark / "dataset_json", json_dir)
    path = json_dir / "SynUpsample.json"
    data = json.loads(path.read_text())
    group = sorted(data["SynUpsample"])[0]
    test_split = data["SynUpsample"][group]["test"]
    del test_split[sorted(test_split)[0]]  # one test video fewer
    path.write_text(json.dumps(data))
    with caplog.at_level("WARNING", logger="fmsd_jax"):
        evaluate.evaluate(cfg, workdir)
    assert "differs from what the training run read" not in caplog.text
    changed = make_cfg(cfg.model.init_from, tiny_benchmark, **{
        "data.dataset_json_folder": str(json_dir)})
    with caplog.at_level("WARNING", logger="fmsd_jax"):
        evaluate.evaluate(changed, workdir)
    assert "SynUpsample/test differs from what the training run read" in caplog.text
    assert "SynBlend/test" not in caplog.text.split("differs")[0]
    manifest = json.loads((workdir / "run.json").read_text())
    assert manifest["evaluate"]["data"]["SynUpsample/test"]["sha256"] != \
        manifest["train"]["data"]["SynUpsample/test"]["sha256"]


@pytest.mark.slow  # a second training run
def test_the_same_run_twice_gives_bit_identical_results(trained, tmp_path, tiny_clip_checkpoint,
                                                        tiny_benchmark,
                                                        without_compilation_cache):
    cfg, workdir, _ = trained
    first = (workdir / "results.json").read_bytes()
    train.train(make_cfg(tiny_clip_checkpoint, tiny_benchmark), tmp_path / "again")
    assert (tmp_path / "again" / "results.json").read_bytes() == first


def test_predict_says_what_it_prints_and_never_replaces_a_file(trained_copy, tiny_benchmark,
                                                               capsys, tmp_path):
    cfg, workdir, _ = trained_copy
    folder = tiny_benchmark / "SynBlend" / "fake" / "frames" / "test_0000"
    result = predict.predict(cfg, workdir, [str(folder)])
    out = capsys.readouterr().out
    rule = json.loads((workdir / "decision.json").read_text())
    t = rule["thresholds"]["video"]["eer"]  # the default operating point, a folder's level
    assert result["operating_point"] == "eer" and result["thresholds"] == {"video": t}
    assert f"# label (videos and folders): fake if P(fake) >= {t:.4g}: the video-level " \
           "equal error rate operating point, chosen on the val split of SynBlend" in out
    assert f"# P(fake): calibrated with T = {rule['temperature']:.4g}" in out
    r = result["inputs"][str(folder)]
    assert f"{r['prob_fake']:.4f}" in out
    assert r["label"] == ("fake" if r["prob_fake"] >= t else "real") and r["level"] == "video"
    assert result["model"] == {"workdir": str(workdir.absolute()), "checkpoint": "best",
                               "step": result["model"]["step"], "regime": "fmsd",
                               "train_dataset": ["SynBlend"]}
    assert (f"# model: {workdir.absolute()}, best checkpoint (step {result['model']['step']}), "
            "FMSD trained on SynBlend") in out
    assert f"# input: {result['processing']}" in out
    assert result["processing"] == (
        "an image is taken whole as a face crop, as DeepfakeBench stores frames (no face "
        "detection); a folder is one video of its images (score: their mean); every frame "
        f"resized to {cfg.data.image_size}x{cfg.data.image_size} px")
    predict.predict(cfg, workdir, [str(folder)])
    assert (workdir / "predictions.json").is_file() and (workdir / "predictions-2.json").is_file()
    assert json.loads((workdir / "predictions.json").read_text()) == result
    with pytest.raises(errors.AlreadyExists, match="predictions.json exists"):
        predict.predict(cfg, workdir, [str(folder)], workdir / "predictions.json")
    # A number as the operating point is the threshold itself: just below the input's P(fake)
    # it is fake, just above it real.
    p = r["prob_fake"]
    for threshold, label in ((p - 1e-4, "fake"), (p + 1e-4, "real")):
        at = make_cfg(cfg.model.init_from, tiny_benchmark,
                      **{"predict.operating_point": repr(threshold)})
        got = predict.predict(at, workdir, [str(folder)], tmp_path / f"{label}.json")
        assert got["thresholds"] == {"video": threshold}
        assert got["inputs"][str(folder)]["label"] == label


def test_predict_per_image_scores_each_image_of_a_folder(trained, tiny_benchmark, tmp_path):
    cfg, workdir, _ = trained
    folder = tiny_benchmark / "SynBlend" / "fake" / "frames" / "test_0000"
    video = predict.predict(cfg, workdir, [str(folder)], tmp_path / "video.json")
    per_image_cfg = make_cfg(cfg.model.init_from, tiny_benchmark, **{"predict.per_image": "1"})
    images = predict.predict(per_image_cfg, workdir, [str(folder)], tmp_path / "images.json")
    frames = video["inputs"][str(folder)]["frame_probs"]
    assert len(images["inputs"]) == len(frames) > 1
    assert all(r["frames"] == 1 for r in images["inputs"].values())
    np.testing.assert_allclose([r["prob_fake"] for r in images["inputs"].values()], frames,
                               atol=1e-6)


def test_predict_exits_nonzero_when_an_input_could_not_be_scored(trained, tiny_benchmark,
                                                                 tmp_path):
    cfg, workdir, _ = trained
    good = sorted((tiny_benchmark / "SynBlend" / "fake" / "frames" / "test_0000").glob("*.png"))[0]
    truncated = tmp_path / "truncated.png"  # a PNG header, then nothing decodable
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(errors.BadInput, match=r"1 of 2 input\(s\) could not be scored.*"
                                              r"truncated\.png"):
        predict.predict(cfg, workdir, [str(good), str(truncated)], tmp_path / "p.json")
    written = json.loads((tmp_path / "p.json").read_text())
    assert list(written["inputs"]) == [str(good)] and written["unreadable"] == [str(truncated)]


def test_predict_explain_writes_subspace_numbers_and_heatmaps(trained, tiny_benchmark,
                                                             tmp_path, capsys):
    """--config.predict.explain=True: each frame's Δ fake logit per subspace equals the
    trained minus the k-undone detector's logit on those pixels, and its heatmap is a PNG
    of the scored crop's size in the folder beside the predictions file."""
    from PIL import Image

    from fmsd_jax.evaluators import subspaces
    from fmsd_jax.evaluators.saliency import overlay_dir

    cfg, workdir, _ = trained
    folder = tiny_benchmark / "SynBlend" / "fake" / "frames" / "test_0000"
    at = make_cfg(cfg.model.init_from, tiny_benchmark,
                  **{"predict.explain": "1", "predict.explain_steps": "8"})
    result = predict.predict(at, workdir, [str(folder)], tmp_path / "p.json")
    ex = result["inputs"][str(folder)]["explain"]
    k = cfg.method.num_subspaces
    frames = sorted(folder.glob("*.png"))
    assert len(ex["frame_subspaces"]) == len(frames) and len(ex["frame_subspaces"][0]) == k
    np.testing.assert_allclose([s["delta_logit"] for s in ex["subspaces"]],
                               np.mean(ex["frame_subspaces"], axis=0), atol=1e-9)
    run = rebuild.open_run(cfg, workdir, parallel.make_mesh(cfg.mesh), estimate=False)
    trainable = rebuild.restore_trainable(cfg, workdir, run)
    predict_fn = scoring.make_predict_fn(run.graphdef, run.mesh)
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in frames])
    pad = np.zeros((cfg.predict.batch_size - len(frames),) + pixels.shape[1:], np.uint8)
    images = np.concatenate([pixels, pad])
    t1 = scoring.temperature_arg(1.0)
    trained_logit = np.asarray(predict_fn(trainable, run.frozen, images, t1)["logit"])
    for j in range(k):
        undone = subspaces.undo_subspaces(run, trainable, [j])
        want = trained_logit - np.asarray(predict_fn(undone, run.frozen, images, t1)["logit"])
        np.testing.assert_allclose(np.asarray(ex["frame_subspaces"])[:, j], want[:len(frames)],
                                   atol=1e-5)
    assert any(abs(v) > 1e-6 for row in ex["frame_subspaces"] for v in row)  # training acted
    assert overlay_dir(tmp_path / "p.json") == tmp_path / "p.saliency"
    for path in ex["heatmaps"]:
        assert Path(path).parent == tmp_path / "p.saliency"
        assert Image.open(path).size == (cfg.data.image_size, cfg.data.image_size)
    assert len(set(ex["heatmaps"])) == len(frames)
    assert "# explain: integrated gradients of the fake logit per patch (8 steps" in \
        capsys.readouterr().out


def test_an_operating_point_the_run_lacks_is_one_line_before_the_model_loads(
        trained_copy, tiny_benchmark, tmp_path, monkeypatch):
    cfg, workdir, _ = trained_copy
    image = sorted((tiny_benchmark / "SynBlend" / "fake" / "frames" / "test_0000").glob(
        "*.png"))[0]
    monkeypatch.setattr(predict.rebuild, "open_run", lambda *a, **k: pytest.fail("loaded"))
    bad = make_cfg(cfg.model.init_from, tiny_benchmark,
                   **{"predict.operating_point": "fpr@0.1"})
    with pytest.raises(errors.BadInput, match=r"operating_point='fpr@0\.1' is not an operating "
                                              r"point: use one of eer, fpr@0\.01, fpr@0\.05"):
        predict.predict(bad, workdir, [str(image)], tmp_path / "a.json")
    (workdir / "decision.json").unlink()  # a run evaluated before decision.json existed
    with pytest.raises(errors.BadInput, match=r"operating point 'eer' is not in this run's "
                                              r"decision.json .*does not exist.*--mode evaluate"):
        predict.predict(cfg, workdir, [str(image)], tmp_path / "b.json")
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


def test_predict_scores_byte_named_inputs_as_their_plain_copies(trained, tiny_benchmark,
                                                                tmp_path, monkeypatch):
    """An image, a frame folder and a video whose names are not valid UTF-8 (b'\\xe9') score
    exactly as copies under plain names; the table prints them escaped on a strict UTF-8
    stdout, and predictions.json gives back their bytes (OpenCV segfaulted on them)."""
    import io

    from conftest import byte_path, write_avi

    cfg, workdir, _ = trained
    folder = tiny_benchmark / "SynBlend" / "fake" / "frames" / "test_0000"
    image = byte_path(tmp_path, b"caf\xe9.png")
    frames = byte_path(tmp_path, b"fold\xe9r")
    video = byte_path(tmp_path, b"vid\xe9o.avi")
    shutil.copy(sorted(folder.glob("*.png"))[0], image)
    shutil.copytree(folder, frames)
    write_avi(video)
    plain = [str(tmp_path / "plain.png"), str(tmp_path / "plain"), str(tmp_path / "plain.avi")]
    shutil.copy(image, plain[0])
    shutil.copytree(frames, plain[1])
    shutil.copy(video, plain[2])
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    centre = make_cfg(cfg.model.init_from, tiny_benchmark, **{"data.face.if_none": "centre"})
    result = predict.predict(centre, workdir, [image, frames, video, *plain], tmp_path / "p.json")
    stdout.flush()
    printed = stdout.buffer.getvalue().decode("utf-8")
    scored = result["inputs"]
    for odd, same in zip([image, frames, video], plain, strict=True):
        assert scored[odd]["frame_probs"] == scored[same]["frame_probs"]
        assert os.fsencode(odd).decode("utf-8", "backslashreplace") in printed
    assert "caf\\xe9.png" in printed and "fold\\xe9r  (" in printed
    written = json.loads((tmp_path / "p.json").read_text())
    assert {os.fsencode(k) for k in written["inputs"]} == {
        os.fsencode(p) for p in [image, frames, video, *plain]}  # keys are sorted
    assert written["inputs"] == scored
