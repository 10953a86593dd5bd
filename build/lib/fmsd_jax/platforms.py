"""Which accelerators this machine has, decided before jax starts its backends.

Why: libtpu is installed on machines without TPUs (requirements-tpu.txt, so that `--mode plan`
can compile for a TPU slice), and jax, asked for its devices with no `JAX_PLATFORMS` set, tries
every backend it knows, TPU included. Starting the TPU backend loads libtpu's runtime, which
looks for the TPU host it runs on and, finding none, prints its warnings and a C++
source-location trace ("could not determine TPU accelerator type", "unexpected worker
hostname", libtpu_init_utils.cc) before the CLI's first line. Where no TPU chip is attached,
`skip_absent_tpu()` replaces the TPU backend's factory with one that refuses at once, so that
libtpu's runtime is never started: nothing is printed, and the other backends (the CPU, a CUDA
or ROCm plugin) are found exactly as before. Compiling for a TPU topology
(`jax.experimental.topologies`, used by `--mode plan`) loads libtpu as a compiler on its own
path and is unaffected.

How chips are found: the way jax itself does (`jax._src.hardware_utils`, private): a PCI device
with Google's vendor id and one of the TPU device ids under /sys/bus/pci/devices. jax runs the
same lookup when it is imported to decide whether it is on a Cloud TPU VM (then it sets
`jax_platforms='tpu,cpu'` itself and asks libtpu to query the VM's metadata; otherwise it tells
libtpu to skip that query), so a TPU VM that jax recognises is one this lookup recognises. That
is checked without a TPU by tests/test_platforms.py: fake sysfs trees with TPU devices are
counted the same by this function and by jax's own, and leave the TPU backend alone.
"""

from __future__ import annotations

import os
from pathlib import Path

PCI_DEVICES = Path("/sys/bus/pci/devices")
GOOGLE_PCI_VENDOR = "0x1ae0"
# jax 0.10.2's table (hardware_utils._TPU_PCI_DEVICE_IDS); other Google devices, such as the
# gVNIC network card of any GCE VM (0x0042), are not TPUs. A test compares it with jax's.
TPU_PCI_DEVICE_IDS: dict[str, str] = {
    "0x0027": "v2/v3",
    "0x0056": "plc",
    "0x005e": "v4",
    "0x0062": "v5p",
    "0x0063": "v5e",
    "0x006f": "v6e",
    "0x0076": "tpu7x",
}


def tpu_chips(pci_devices: Path = PCI_DEVICES) -> int:
    """How many TPU chips are attached over PCI (0 on a machine without a sysfs PCI tree)."""
    chips = 0
    for vendor in pci_devices.glob("*/vendor"):
        try:
            if (vendor.read_text().strip() == GOOGLE_PCI_VENDOR
                    and (vendor.parent / "device").read_text().strip() in TPU_PCI_DEVICE_IDS):
                chips += 1
        except OSError:  # a device removed while we read, or a file we may not read
            continue
    return chips


def _no_tpu_here() -> None:
    raise RuntimeError(
        f"no TPU chip on this machine (no Google TPU device under {PCI_DEVICES}), so fmsd_jax "
        "did not start libtpu's runtime; set JAX_PLATFORMS=tpu,cpu to make jax try anyway")


def skip_absent_tpu(pci_devices: Path = PCI_DEVICES) -> bool:
    """Keep jax from starting libtpu's runtime where no TPU chip is attached; True if it did.

    Call before anything asks jax for devices. A platform list already chosen is left alone:
    the user's `JAX_PLATFORMS` (or `jax.config.update('jax_platforms', ...)`), the 'tpu,cpu'
    jax sets on a Cloud TPU VM, and jax's own `JAX_FORCE_TPU_INIT`. Only the TPU factory is
    replaced, so GPU plugins are still discovered; an explicit request for the TPU backend
    (`jax.devices('tpu')`) fails with the message of `_no_tpu_here`.
    """
    import jax
    from jax.extend import backend

    if jax.config.jax_platforms or "JAX_FORCE_TPU_INIT" in os.environ:
        return False
    if tpu_chips(pci_devices):
        return False
    # jax's own registration has the same priority and also fails quietly (an info log).
    backend.register_backend_factory("tpu", _no_tpu_here, priority=300, fail_quietly=True)
    return True
