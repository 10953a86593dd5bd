"""A user's mistake ends in one line naming the thing and the fix, exit status 2, before any
work and without writing anything; an internal error keeps its traceback (exit 1)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import make_cfg, one_line_error, run_cli

from fmsd_jax import atomic, errors, main
from fmsd_jax.demo import recipe, rows
from fmsd_jax.modes import train

ROOT = Path(__file__).resolve().parents[1]


def test_help_exits_0_and_shows_overrides_and_variants():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert "--config.a.b=value" in proc.stdout
    assert "configs/clip_b16.py:runlocal" in proc.stdout and ":method=effort" in proc.stdout
    assert "--workdir" in proc.stdout and "--mode" in proc.stdout


def test_config_file_and_argument_mistakes_are_one_line(tmp_path):
    line = one_line_error(run_cli("--config", "configs/dmeo.py", f"--workdir={tmp_path}/w"))
    assert "configs/dmeo.py" in line and "did you mean configs/demo.py" in line
    line = one_line_error(run_cli("--config", "configs/clip_b16.py:runlocl",
                                  f"--workdir={tmp_path}/w"))
    assert "'runlocl'" in line and "runlocal" in line
    # A demo row's typo fails at parse time: nothing written, not even the workdir's parent.
    line = one_line_error(run_cli("--config", f"{ROOT}/configs/demo.py:method=fsmd",
                                  "--workdir", "scratch/x", cwd=tmp_path))
    assert "method='fsmd'" in line and "'fmsd'" in line
    line = one_line_error(run_cli("--config", "configs/clip_b16.py", f"--workdir={tmp_path}/w",
                                  "--config.method.spectral_form=frob"))
    assert "spectral_form" in line and "frobenius" in line
    assert list(tmp_path.iterdir()) == []


def test_predict_checks_every_input_before_loading_a_model(tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    (tmp_path / "notes.mp4").write_text("not a video")  # FFmpeg's own complaint stays quiet
    os.mkfifo(tmp_path / "pipe.png")  # reading it would block for ever
    line = one_line_error(run_cli("--config", "configs/clip_b16.py:runlocal",
                                  f"--workdir={tmp_path}/never_trained", "--mode", "predict",
                                  "/no/such.png", str(notes), str(tmp_path / "notes.mp4"),
                                  str(tmp_path / "pipe.png")))
    assert "/no/such.png (no such file or folder)" in line
    assert "notes.png (not an image OpenCV can decode)" in line
    assert "notes.mp4 (no decodable video frames)" in line
    assert "pipe.png (not a regular file)" in line
    assert not (tmp_path / "never_trained").exists()


def test_user_errors_print_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    def diverge(argv):
        raise errors.TrainingDiverged("loss became nan by step 2; lower config.optim.lr")

    monkeypatch.setattr(main, "main", diverge)
    with pytest.raises(SystemExit) as e:
        main.user_errors_in_one_line(["prog"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: loss became nan by step 2; lower config.optim.lr\n"

    def bug(argv):
        raise ValueError("an internal error")

    monkeypatch.setattr(main, "main", bug)
    with pytest.raises(ValueError, match="an internal error"):  # absl prints the traceback
        main.user_errors_in_one_line(["prog"])


def test_a_missing_test_frame_is_named_before_training(tmp_path, tiny_clip_checkpoint,
                                                       tiny_benchmark):
    json_dir = tmp_path / "json"
    shutil.copytree(tiny_benchmark / "dataset_json", json_dir)
    path = json_dir / "SynUpsample.json"
    data = json.loads(path.read_text())
    groups = data["SynUpsample"]
    group = sorted(groups)[0]
    video = sorted(groups[group]["test"])[0]
    groups[group]["test"][video]["frames"][0] = "SynUpsample/gone/000.png"
    path.write_text(json.dumps(data))
    cfg = make_cfg(tiny_clip_checkpoint, tiny_benchmark,
                   **{"data.dataset_json_folder": str(json_dir)})
    with pytest.raises(errors.InputNotFound) as e:
        train.train(cfg, tmp_path / "run")
    msg = str(e.value)
    assert "SynUpsample.json" in msg and "split 'test'" in msg and "gone/000.png" in msg
    assert "\n" not in msg
    assert not (tmp_path / "run" / "checkpoints").exists()  # no step was run


def demo_cfg(method: str, root: str = ""):
    spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(f"quick,method={method}")
    c.demo.root = root
    return c


def make_inputs(root: Path) -> None:
    (root / "data" / "dataset_json").mkdir(parents=True)
    (root / "pretrained").mkdir(parents=True)
    (root / "pretrained" / "model.safetensors").write_bytes(b"")


def test_a_demo_row_never_writes_above_its_workdir(tmp_path):
    row = tmp_path / "scratch" / "x"
    cfg = demo_cfg("effort")
    # No prepared demo in the parent: the row prepares its own inside its workdir.
    assert rows.shared_root(cfg, row) == row
    # A prepared demo in the parent (runs/demo/effort): read from there, write nothing there.
    make_inputs(tmp_path / "scratch")
    assert rows.shared_root(cfg, row) == tmp_path / "scratch"
    assert rows.reads_prepared_inputs(cfg, row)
    # A row that has its own inputs keeps them; demo.root overrides both.
    make_inputs(row)
    assert rows.shared_root(cfg, row) == row and not rows.reads_prepared_inputs(cfg, row)
    assert rows.shared_root(demo_cfg("effort", str(tmp_path / "elsewhere")), row) == \
        tmp_path / "elsewhere"
    assert rows.shared_root(demo_cfg("all"), row) == row


def test_a_demo_row_says_where_it_reads_before_it_starts(tmp_path, caplog, monkeypatch):
    make_inputs(tmp_path)
    cfg = demo_cfg("effort")
    calls = []
    monkeypatch.setattr(rows, "prepare_data", lambda *a: calls.append("data"))
    monkeypatch.setattr(rows, "prepare_backbone", lambda *a: calls.append("backbone") or {})
    monkeypatch.setattr(rows, "run_row", lambda *a: ({}, 0.0, True))
    with caplog.at_level(logging.INFO, logger="fmsd_jax"):
        recipe.run(cfg, tmp_path / "effort")
    assert calls == []  # reading a prepared demo: nothing is prepared (written) above
    assert f"reading the benchmark from {tmp_path / 'data'}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fmsd_jax"):
        recipe.run(cfg, tmp_path / "other" / "effort")
    assert calls == ["data", "backbone"]
    assert f"writing the benchmark to {tmp_path / 'other' / 'effort' / 'data'}" in caplog.text


def test_resume_under_another_experiment_is_refused_and_longer_runs_are_not(
        tmp_path, tiny_clip_checkpoint, tiny_benchmark):
    from fmsd_jax.run import checkpoints, workdir_files

    cfg = make_cfg(tiny_clip_checkpoint, tiny_benchmark)
    # A save killed before it finished leaves only orbax's temporary directory: no checkpoint.
    (tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
    checkpoints.check_resumable(tmp_path, cfg)
    assert checkpoints.latest_saved_step(tmp_path) is None
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)  # what orbax leaves after step 2
    assert checkpoints.latest_saved_step(tmp_path) == 2
    with pytest.raises(errors.AlreadyExists, match="holds checkpoints but no config.json"):
        checkpoints.check_resumable(tmp_path, cfg)
    atomic.write_json(tmp_path / workdir_files.CONFIG_JSON, cfg.to_dict())
    checkpoints.check_resumable(tmp_path, cfg)  # the same run: resumes
    longer = make_cfg(tiny_clip_checkpoint, tiny_benchmark,
                      **{"train.total_steps": "40", "eval.batch_size": "4"})
    checkpoints.check_resumable(tmp_path, longer)  # run longer, evaluate differently: fine
    other = make_cfg(tiny_clip_checkpoint, tiny_benchmark,
                     **{"optim.lr": "0.1", "method.regime": "effort"})
    with pytest.raises(errors.AlreadyExists,
                       match=r"different config.*'method.regime'.*'optim.lr'"):
        checkpoints.check_resumable(tmp_path, other)
    assert checkpoints.config_differences(tmp_path / "none", cfg) is None
    # A run from before calibration and the dlib face crop: its config.json holds
    # predict.threshold and the retired data.video.* fields. Trained on stored DeepfakeBench
    # crops, it resumes; trained on raw videos (their crops came from the retired cascade), not.
    old = cfg.to_dict()
    old["predict"]["threshold"] = 0.5
    del old["predict"]["operating_point"]
    old["data"]["video"] = {"face_margin": 1.3, "detect_faces": True}
    del old["data"]["face"]
    atomic.write_json(tmp_path / workdir_files.CONFIG_JSON, old)
    assert cfg.data.source == "deepfakebench"
    checkpoints.check_resumable(tmp_path, cfg)
    videos = make_cfg(tiny_clip_checkpoint, tiny_benchmark, **{"data.source": "folder"})
    old["data"]["source"] = "folder"
    atomic.write_json(tmp_path / workdir_files.CONFIG_JSON, old)
    with pytest.raises(errors.AlreadyExists, match=r"different config.*'data.face.detector'"):
        checkpoints.check_resumable(tmp_path, videos)


def test_a_careless_users_settings_and_workdirs_are_named_before_work(tmp_path):
    from fmsd_jax import config_base
    from fmsd_jax.run import preflight

    cfg = config_base.base_config()
    for field, value, said in [("train.batch_size", 0, "config.train.batch_size=0 must be an "
                                "integer >= 1"),
                               ("train.total_steps", -5, "config.train.total_steps=-5 must be "
                                "an integer >= 0"),
                               ("optim.lr", float("nan"), "config.optim.lr=nan must be a "
                                "finite number above 0")]:
        bad = cfg.copy_and_resolve_references()
        node = bad
        *parents, leaf = field.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
        with pytest.raises(errors.BadInput, match=re.escape(said)):
            preflight.check_config(bad)
    preflight.check_config(cfg)  # the defaults pass

    a_file = tmp_path / "afile"
    a_file.write_text("")
    with pytest.raises(errors.BadInput, match="is a file, not a folder"):
        preflight.check_workdir(a_file)
    with pytest.raises(errors.BadInput, match=r"afile is a file, so the folder cannot be "
                                              r"created"):
        preflight.check_workdir(a_file / "run")
    preflight.check_workdir(tmp_path / "new" / "run")  # created later by the mode
    assert not (tmp_path / "new").exists()

    truncated = tmp_path / "config.json"
    truncated.write_text('{"data": {"image_size": 2')
    with pytest.raises(errors.BadInput, match=r"config.json is not valid JSON \(.*\); it is "
                                              r"damaged"):
        atomic.read_json(truncated)
