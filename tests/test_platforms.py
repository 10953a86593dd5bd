"""A machine without TPUs never starts libtpu's runtime, and one with TPUs is left to jax.

No TPU is needed: the chip lookup runs on fake sysfs PCI trees, and jax's own lookup (the one
it uses on import to recognise a Cloud TPU VM) is run on the same trees and must agree, so a TPU
VM that jax finds its chips on is one where fmsd_jax leaves the TPU backend alone. The CLI is
started once on this machine to show that nothing about TPUs is printed; tests/test_plan.py's
CLI run shows that `--mode plan` still compiles for a TPU slice in such a process.
"""

from __future__ import annotations

import glob as glob_module
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.extend import backend as jax_backend

from fmsd_jax import platforms

ROOT = Path(__file__).resolve().parents[1]
NVIDIA, GVNIC = ("0x10de", "0x2330"), (platforms.GOOGLE_PCI_VENDOR, "0x0042")


def fake_pci_tree(root: Path, devices: list[tuple[str, str]]) -> Path:
    """/sys/bus/pci/devices as the kernel lays it out: one folder per device, ids in hex."""
    for i, (vendor, device) in enumerate(devices):
        d = root / f"0000:00:{i + 4:02x}.0"
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "device").write_text(device + "\n")
        (d / "class").write_text("0x120000\n")
    return root


def tpu_vm(root: Path, device_id: str = "0x0063", chips: int = 4) -> Path:
    """A v5e host (4 chips by default) with the gVNIC network card every GCE VM has."""
    return fake_pci_tree(root, [GVNIC] + [(platforms.GOOGLE_PCI_VENDOR, device_id)] * chips)


@pytest.fixture
def registrations(monkeypatch) -> list[tuple]:
    """Backend factories registered with jax during the test, instead of registering them."""
    seen: list[tuple] = []
    monkeypatch.setattr(jax_backend, "register_backend_factory",
                        lambda name, factory, **kw: seen.append((name, factory, kw)))
    monkeypatch.delenv("JAX_FORCE_TPU_INIT", raising=False)
    return seen


@pytest.fixture
def platforms_config():
    """Sets jax_platforms for one test and puts the session's value back."""
    before = jax.config.jax_platforms
    yield lambda value: jax.config.update("jax_platforms", value)
    jax.config.update("jax_platforms", before)


def test_only_google_tpu_devices_count_as_chips(tmp_path):
    assert platforms.tpu_chips(tpu_vm(tmp_path / "v5e")) == 4
    assert platforms.tpu_chips(tpu_vm(tmp_path / "v4", "0x005e", chips=1)) == 1
    # A GCE GPU VM: Google's vendor id on its network card is not a TPU.
    assert platforms.tpu_chips(fake_pci_tree(tmp_path / "gpu", [GVNIC, NVIDIA, NVIDIA])) == 0
    assert platforms.tpu_chips(tmp_path / "no-sysfs") == 0


def test_the_lookup_agrees_with_jaxs_own_on_every_tree(tmp_path, monkeypatch):
    """jax decides on import whether it is on a Cloud TPU VM with this lookup (private API: the
    test is skipped, not failed, where a jax version moves it)."""
    hardware_utils = pytest.importorskip("jax._src.hardware_utils")
    if not hasattr(hardware_utils, "_TPU_PCI_DEVICE_IDS"):
        pytest.skip("this jax keeps its TPU PCI table elsewhere")
    assert set(platforms.TPU_PCI_DEVICE_IDS) == set(hardware_utils._TPU_PCI_DEVICE_IDS)
    assert platforms.GOOGLE_PCI_VENDOR == hardware_utils._GOOGLE_PCI_VENDOR_ID
    trees = [tpu_vm(tmp_path / f"tpu{i}", d) for i, d in enumerate(platforms.TPU_PCI_DEVICE_IDS)]
    trees += [fake_pci_tree(tmp_path / "gpu", [GVNIC, NVIDIA]), tmp_path / "none"]
    real_glob = glob_module.glob
    for tree in trees:  # jax globs /sys/bus/pci/devices/*/vendor: point it at the fake tree
        monkeypatch.setattr(glob_module, "glob", lambda pattern, t=tree: real_glob(
            pattern.replace(str(platforms.PCI_DEVICES), str(t))))
        jax_count, _ = hardware_utils.num_available_tpu_chips_and_device_id()
        assert platforms.tpu_chips(tree) == jax_count, tree.name


def test_tpu_backend_is_kept_from_starting_only_where_no_chip_is(tmp_path, registrations,
                                                                 platforms_config):
    platforms_config(None)
    assert platforms.skip_absent_tpu(tpu_vm(tmp_path / "vm")) is False
    assert registrations == []  # a TPU VM: jax's own TPU factory finds the chips
    assert platforms.skip_absent_tpu(tmp_path / "laptop") is True
    [(name, factory, kw)] = registrations
    assert name == "tpu" and kw["fail_quietly"]  # jax then falls back, as it does itself
    with pytest.raises(RuntimeError, match="JAX_PLATFORMS=tpu,cpu"):
        factory()


def test_a_chosen_platform_list_is_left_alone(tmp_path, registrations, platforms_config,
                                              monkeypatch):
    """The user's JAX_PLATFORMS (and the 'tpu,cpu' jax sets itself on a Cloud TPU VM) decide."""
    for chosen in ("cpu", "tpu,cpu", "cuda,cpu"):
        platforms_config(chosen)
        assert platforms.skip_absent_tpu(tmp_path / "laptop") is False
    platforms_config(None)
    monkeypatch.setenv("JAX_FORCE_TPU_INIT", "1")
    assert platforms.skip_absent_tpu(tmp_path / "laptop") is False
    assert registrations == []


@pytest.mark.skipif(platforms.tpu_chips() > 0, reason="this machine has TPUs")
def test_a_cli_start_on_a_machine_without_chips_says_nothing_about_them(tmp_path):
    """`--mode export` makes its device mesh first, so jax has started every backend it tries
    by the time the missing checkpoint is reported; with libtpu installed or not.

    The environment is a user's shell: without the TPU_*/JAX_* variables that importing jax
    (and the planner's tests) set in this process. ALLOW_MULTIPLE_LIBTPU_LOAD keeps the result
    independent of other jax processes on the machine: whichever holds libtpu's lock file
    (/tmp/libtpu_lockfile) makes libtpu give up silently in all the others, hiding the noise.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "JAX_", "LIBTPU"))}
    env.update(PYTHONPATH=str(ROOT), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fmsd_jax.main", "--config", "configs/clip_b16.py:runlocal",
         f"--workdir={tmp_path}/w", "--mode=export"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()]  # only the error line
    assert proc.stderr.startswith("error: config.model.init_from is empty")
    assert not re.search("tpu", proc.stdout + proc.stderr, re.I), proc.stdout + proc.stderr
