"""The offline demo (`configs/demo.py:quick`): every stage runs, the report holds a full
method × family table, the backbone is a loadable CLIP checkpoint, and reruns skip work.

The quick variant is run once per module in-process (the CLI path is covered by the rerun of
one row through `python -m fmsd_jax.main`). Its numbers only show that the pipeline runs; the
full demo's numbers are in configs/demo.py's docstring."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmsd_jax import demo
from fmsd_jax.data.config import SYNTHETIC_DATASETS
from fmsd_jax.demo import recipe, rows, sweep

REPO = Path(__file__).resolve().parents[1]


def demo_config(arg: str = "quick"):
    spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory, tiny_benchmark):
    """The quick demo in a fresh workdir; its data dir is the session's tiny benchmark (the
    same size and seed, so the demo finds it finished instead of writing it again)."""
    workdir = tmp_path_factory.mktemp("demo") / "run"
    workdir.mkdir()
    os.symlink(tiny_benchmark, workdir / "data")
    out = recipe.run(demo_config("quick"), workdir)
    return workdir, out


def _table(text: str) -> tuple[list[str], list[list[str]]]:
    """The first Markdown table of `text`: header and body rows."""
    lines: list[str] = []
    for ln in text.splitlines():
        if ln.startswith("|"):
            lines.append(ln)
        elif lines:
            break
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    return cells[0], cells[2:]


def test_report_has_every_method_and_family(quick_demo):
    workdir, out = quick_demo
    text = (workdir / "report.md").read_text()
    header, body = _table(text)
    assert [r[0] for r in body] == [rows.ROW_NAMES[m] for m in demo.METHODS]
    # Each cell is the number its row's evaluation wrote to results.json (4 decimals); that
    # number is sklearn's AUC of the run's test predictions (tests/test_train.py).
    for family in SYNTHETIC_DATASETS:
        for level, key in (("frame AUC", "frame_auc"), ("video AUC", "video_auc")):
            col = next(i for i, h in enumerate(header)
                       if h.startswith(family) and h.endswith(level))
            for m, r in zip(demo.METHODS, body, strict=True):
                saved = json.loads((workdir / m / "results.json").read_text())[family][key]
                assert float(r[col]) == pytest.approx(saved, abs=5e-5), (m, family, level)
    # The verdicts are computed, and every row has its reproduce command.
    assert "Does FMSD beat the baselines?" in text
    assert text.count("FMSD beat") + text.count("FMSD does not") >= 3
    for m in demo.METHODS:
        assert f"--config configs/demo.py:quick,method={m} --workdir {workdir / m}" in text
    assert (workdir / "fmsd" / "layer_scores.png").exists()
    assert all((workdir / m / "roc.png").exists() for m in demo.METHODS)
    assert set(out["results"]) == set(demo.METHODS)


def test_report_has_a_robustness_table_for_every_row(quick_demo):
    workdir, _ = quick_demo
    text = (workdir / "report.md").read_text()
    section = text[text.index("## Robustness to unseen perturbations"):]
    family = demo_config("quick").demo.robustness.family
    assert f"**{family}**" in section
    for level, key in (("### Frame AUC", "frame_auc"), ("### Video AUC", "video_auc")):
        header, body = _table(section[section.index(level):])
        assert header[:2] == ["method", "clean"] and header[-1] == "mean"
        assert [r[0] for r in body] == [rows.ROW_NAMES[m] for m in demo.METHODS]
        for m, r in zip(demo.METHODS, body, strict=True):
            # 'clean' scores the same checkpoint on the same frames as the row's evaluation,
            # by another code path (the robustness pass), so the two numbers agree.
            saved = json.loads((workdir / m / "results.json").read_text())[family][key]
            assert float(r[1]) == pytest.approx(saved, abs=5e-5), (m, level)
            # Every type has the same levels: the overall mean is the mean of the type means.
            types = [float(c) for c in r[2:-1] if c != "n/a"]
            if len(types) == len(r) - 3:
                assert float(r[-1]) == pytest.approx(np.mean(types), abs=1e-4), (m, level)
    for m in demo.METHODS:
        assert (workdir / m / "robustness.json").is_file()


def test_report_shows_operating_points_calibration_and_subspaces(quick_demo):
    """Each cell of the decision section is its row's results.json number (TPR / FPR at the
    validation 5 %-FPR frame threshold), and FMSD's subspace table has a row per subspace and
    a computed reading."""
    workdir, _ = quick_demo
    text = (workdir / "report.md").read_text()
    section = text[text.index("## From a score to a decision"):]
    header, body = _table(section)
    held = [f for f in SYNTHETIC_DATASETS if f != "SynBlend"]
    assert header[:2] == ["method", "T"] and len(header) == 2 + len(held)
    assert [r[0] for r in body] == [rows.ROW_NAMES[m] for m in demo.METHODS]
    for m, r in zip(demo.METHODS, body, strict=True):
        rule = json.loads((workdir / m / "decision.json").read_text())
        assert float(r[1]) == pytest.approx(rule["temperature"], rel=2e-3)
        saved = json.loads((workdir / m / "results.json").read_text())
        for family, cell in zip(held, r[2:], strict=True):
            p = saved[family]["operating_points"]["frame"]["fpr@0.05"]
            assert p["threshold"] == rule["thresholds"]["frame"]["fpr@0.05"]
            assert cell == (f"{100 * p['tpr']:.0f} % / {100 * p['fpr']:.0f} % "
                            f"({100 * p['oracle_tpr']:.0f} %)"), (m, family)
    cal_header, cal = _table(section[section.index("| method | ECE before"):])
    for m, r in zip(demo.METHODS, cal, strict=True):
        saved = json.loads((workdir / m / "results.json").read_text())
        want = np.mean([saved[f]["calibration"]["after"]["ece"] for f in held])
        assert float(r[2]) == pytest.approx(want, abs=5e-5), m
    assert "The validation temperature lowered the held-out ECE for" in section
    sub = text[text.index("## What each artifact subspace responds to (FMSD)"):]
    k = demo_config("quick").method.num_subspaces
    sub_header, sub_rows = _table(sub)
    assert sub_header[1:] == list(SYNTHETIC_DATASETS)
    assert [r[0] for r in sub_rows[:k]] == [f"subspace {i}" for i in range(k)]
    assert ("respond differently" in sub) or ("no sign" in sub) or ("no evidence" in sub)
    assert (workdir / "fmsd" / "subspaces.png").is_file()


def test_pretrained_backbone_is_a_clip_checkpoint(quick_demo):
    from fmsd_jax.model.weights.load import load_clip_vision

    workdir, out = quick_demo
    cfg = demo_config("quick")
    tower = load_clip_vision(workdir / "pretrained" / "model.safetensors")
    p = cfg.demo.pretrain
    assert (tower.cfg.width, tower.cfg.layers, tower.cfg.heads, tower.cfg.patch_size) == (
        p.width, p.layers, p.heads, p.patch_size)
    assert tower.cfg.activation == "quick_gelu"
    assert (workdir / "pretrained" / "config.json").exists()
    # Every row was trained from this file.
    for m in demo.METHODS:
        sub = rows.method_config(cfg, m, workdir / "data", workdir / "pretrained")
        assert Path(sub.model.init_from) == (workdir / "pretrained" / "model.safetensors")


def test_rerun_skips_finished_stages(quick_demo):
    workdir, _ = quick_demo
    stamp = {p: p.stat().st_mtime_ns for p in workdir.rglob("*.json")}
    timing = workdir / "demo_timing.json"
    first = timing.read_text()
    timing.unlink()  # a rerun that has no record of the first run's times
    again = recipe.run(demo_config("quick"), workdir)
    assert set(again["skipped"]) == {"pretrain", *demo.METHODS}
    time_line = next(line for line in (workdir / "report.md").read_text().splitlines()
                     if line.startswith("**Time.**"))
    assert "pretrain reused" in time_line and "fmsd reused" in time_line, time_line
    timing.write_text(first)
    # Nothing a finished stage wrote was rewritten.
    changed = [p for p, t in stamp.items() if p.stat().st_mtime_ns != t
               and p.name != "demo_timing.json"]
    assert not changed, changed
    assert (workdir / "report.md").exists()


def test_row_command_reproduces_a_row_through_the_cli(quick_demo):
    """The report's command for one row runs that row only (here: finds it done)."""
    workdir, _ = quick_demo
    cmd = [sys.executable, "-m", "fmsd_jax.main", "--config", "configs/demo.py:quick,method=effort",
           "--workdir", str(workdir / "effort")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reading the benchmark from" in proc.stdout  # the demo above, read, not written
    assert "finished run found" in proc.stdout


def test_a_changed_row_config_is_refused(quick_demo):
    workdir, _ = quick_demo
    cfg = demo_config("quick")
    sub = rows.method_config(cfg, "effort", workdir / "data", workdir / "pretrained")
    assert rows.row_is_done(sub, workdir / "effort") is not None
    sub.train.total_steps = 5
    with pytest.raises(FileExistsError, match="different config"):
        rows.row_is_done(sub, workdir / "effort")


def test_overrides_appear_in_the_reproduce_command(tmp_path):
    cfg = demo_config("")
    cfg.train.total_steps = 123
    cmd = rows.row_command(cfg, "full", tmp_path / "full")
    assert cmd.startswith("python -m fmsd_jax.main --config configs/demo.py:method=full ")
    assert "--config.train.total_steps=123" in cmd
    assert "demo.method" not in cmd


def test_method_configs_follow_the_regimes(tmp_path):
    cfg = demo_config("")
    effort = rows.method_config(cfg, "effort", tmp_path / "d", tmp_path / "p")
    assert (effort.method.num_subspaces, effort.method.rank) == (1, 1)
    assert not effort.method.mask.enabled and "demo" not in effort
    fmsd = rows.method_config(cfg, "fmsd", tmp_path / "d", tmp_path / "p")
    assert fmsd.method.mask.enabled and fmsd.method.num_subspaces == 4
    full = rows.method_config(cfg, "full", tmp_path / "d", tmp_path / "p")
    assert (full.optim.lr, full.optim.head_lr) == (cfg.demo.optim.full.lr,
                                                   cfg.demo.optim.full.head_lr)
    with pytest.raises(ValueError, match="one of"):
        rows.method_config(cfg, "nope", tmp_path / "d", tmp_path / "p")


def test_simclr_learns_on_real_photos(tmp_path):
    """Loss falls well below its start, and the written tower loads as CLIP."""
    from fmsd_jax.data.synthetic import real_photos
    from fmsd_jax.demo import pretrain

    photos = real_photos(split="train")[:4]
    cfg = pretrain.PretrainConfig(width=32, layers=2, heads=2, mlp_dim=64, image_size=32,
                                  steps=60, batch_size=32, warmup_steps=5, lr=3e-3,
                                  proj_hidden=32, proj_dim=16, log_every=10, knn_crops=0)
    rec = pretrain.pretrain(photos, cfg, tmp_path / "p")
    losses = [h["loss"] for h in rec["history"]]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.25, losses  # measured: 4.10 → 3.65
    assert pretrain.check_loads(tmp_path / "p", 32).width == 32
    # Same settings: skipped; other settings: refused.
    assert pretrain.pretrain(photos, cfg, tmp_path / "p")["skipped"]
    with pytest.raises(FileExistsError):
        pretrain.pretrain(photos, dataclasses.replace(cfg, steps=61), tmp_path / "p")


def test_nt_xent_prefers_matching_views():
    from fmsd_jax.demo.pretrain import nt_xent

    rng = np.random.default_rng(0)
    z = rng.normal(size=(8, 16)).astype(np.float32)
    matched, acc = nt_xent(z, z + 0.01 * rng.normal(size=z.shape).astype(np.float32), 0.2)
    shuffled, _ = nt_xent(z, rng.normal(size=z.shape).astype(np.float32), 0.2)
    assert float(acc) == 1.0
    assert float(matched) < float(shuffled)


def test_report_shows_contribution_and_explains_below_chance(tmp_path):
    """The contribution column (from each row's diagnostics), its words when within noise,
    and one computed sentence for a held-out family every method ranks upside down."""
    from fmsd_jax.demo import report

    def row(name, aucs, contribution=None, ci=None):
        res = {f: {"frame_auc": a, "video_auc": a - 0.01} for f, a in aucs.items()}
        return report.DemoRow(name, res, "cmd", contribution=contribution, contribution_ci=ci,
                              contribution_videos=128 if ci else None)

    rows = [row("FMSD", {"A": .8, "B": .3, "C": .6}, 0.05, (0.02, 0.08)),
            row("Effort", {"A": .8, "B": .2, "C": .45}, 0.001, (-0.01, 0.012)),
            row("Probe", {"A": .7, "B": .4, "C": .55})]
    text = report.write_demo_report(tmp_path / "r.md", rows, train_families=["A"]).read_text()
    header, body = _table(text)
    col = header.index("backbone contribution · val frame AUC [95 %]")
    assert [r[col] for r in body] == ["+0.0500 [+0.020, +0.080]", "+0.0010 [-0.010, +0.012]",
                                      "n/a"]
    assert "(the validation split of A, the checkpoint-selection split, 128 videos)" in text
    assert "**Effort: the backbone did not adapt; the head did the work**" in text
    assert "FMSD: the adapted backbone adds 0.0500" in text
    assert "**B is below chance for every method (3 of 3)**: frame AUC 0.200–0.400" in text
    assert "a flipped score would reach 0.600–0.800" in text
    # C: only Effort is below 0.5, and the sentence names who is and who is not.
    assert "**C is below chance for 1 of 3 methods (Effort; not FMSD, Probe)**" in text
    assert "A is below chance" not in text  # the training family is not a held-out family


def test_choose_learning_rates_and_table():
    from fmsd_jax.demo import report

    def point(m, lr, auc, step=50):
        return {"method": m, "lr": lr, "head_lr": 1e-3, "best": {"frame_auc": auc, "step": step}}

    pts = [point("fmsd", 2e-4, .60), point("fmsd", 2e-3, .70), point("fmsd", 2e-2, .70),
           point("full", 2e-4, .65), point("full", 2e-3, float("nan"))]
    chosen = sweep.choose_learning_rates(pts, "frame_auc")
    assert chosen == {"fmsd": 2e-3, "full": 2e-4}  # a tie goes to the earlier (smaller) lr
    table = report.sweep_table(pts, chosen)
    header, body = _table(table)
    assert header == ["method", "head lr", "lr 0.0002", "lr 0.002", "lr 0.02", "chosen lr"]
    assert body[0] == ["fmsd", "0.001", "0.6000 @50", "**0.7000 @50**", "0.7000 @50", "0.002"]
    assert body[1][-2:] == ["", "0.0002"]


def test_sweep_scores_only_the_validation_split(quick_demo, monkeypatch):
    """`configs/demo.py:quick,sweep`: every point is scored on SynBlend's validation split and
    no test set (no held-out family) is ever loaded; the lr with the best validation AUC is
    chosen and the table printed and written."""
    import json

    from fmsd_jax.data import pipeline

    workdir, _ = quick_demo
    seen = []
    real = pipeline.make_eval_loader

    def spy(data_cfg, name, *, split="test", **kw):
        seen.append((name, split))
        return real(data_cfg, name, split=split, **kw)

    monkeypatch.setattr(pipeline, "make_eval_loader", spy)
    cfg = demo_config("quick,sweep")
    cfg.demo.sweep.methods = ("effort",)
    out = recipe.run(cfg, workdir)
    assert seen and set(seen) == {("SynBlend", "val")}
    rec = json.loads((workdir / "sweep" / demo.SWEEP_JSON).read_text())
    assert [p["lr"] for p in rec["points"]] == list(cfg.demo.sweep.lrs)
    best = max(rec["points"], key=lambda p: p["best"]["frame_auc"])
    assert rec["chosen"] == {"effort": best["lr"]} == out["chosen"]
    assert "--config configs/demo.py:quick,sweep" in rec["command"]
    assert out["table"] in (workdir / "sweep" / "sweep.md").read_text()
