"""TPU slices: the chips we know (HBM, peak FLOPs, ICI), slice names and topologies,
and libtpu's topology devices that let a CPU machine compile for a slice."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

from fmsd_jax import platforms
from fmsd_jax.errors import BadInput

INSTALL_HINT = ("libtpu is not installed; compiling for TPU from this machine needs it: "
                "pip install -r requirements-tpu.txt")
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_gib: float  # HBM per chip
    bf16_tflops: float  # peak dense bf16 per chip
    cores_in_name: int  # accelerator-type suffix counts TensorCores (2/chip) or chips (1)
    torus_dims: int  # the slice's interconnect: a 2-D (v5e/v6e) or 3-D (v4/v5p) torus

    @property
    def megacore(self) -> bool:
        """Two TensorCores run as one device, as on a real v4/v5p slice."""
        return self.cores_in_name == 2


# Per-chip figures from Google's TPU system-architecture pages (cloud.google.com/tpu/docs/v4,
# /v5e, /v5p, /v6e, read 2026-12): HBM capacity and peak bf16 FLOP/s.
CHIPS: dict[str, Chip] = {
    "v4": Chip(32, 275, 2, 3),
    "v5e": Chip(16, 197, 1, 2),
    "v5p": Chip(95, 459, 2, 3),
    "v6e": Chip(32, 918, 1, 2),
}
_ALIASES = {"v5litepod": "v5e", "v6": "v6e"}


class PlanError(BadInput):
    """A user-facing problem with the plan's arguments (one line, exit status 2)."""


# ---------------------------------------------------------------------------------------------
# Topologies


def _grid(chips: int, dims: int) -> str:
    """The slice shape Cloud TPU uses for `chips` chips: 2-D (v5e/v6e) or 3-D (v4/v5p)."""
    if dims == 2:
        side = 2 ** (int(math.log2(chips)) // 2)
        return f"{side}x{chips // side}"
    shape = [1, 1, 1]
    i = 0
    while math.prod(shape) < chips:
        shape[i % 3] *= 2
        i += 1
    shape = sorted(shape, key=lambda d: (d == 1, d))  # Cloud TPU writes v4-8 as 2x2x1
    return "x".join(map(str, shape))


def parse_topology(name: str) -> tuple[str, str, int]:
    """(generation, libtpu topology name, chips) for 'v5e-256', 'v4-128' or 'v5e:16x16'."""
    m = re.fullmatch(r"(v\d+[a-z]*)[-:](.+)", name.strip())
    if not m:
        raise PlanError(f"--topology={name!r} is not a TPU slice; use e.g. v5e-256, v4-128, "
                        "v5p-512 or a topology name such as v5e:16x16")
    gen, rest = _ALIASES.get(m.group(1), m.group(1)), m.group(2)
    if gen not in CHIPS:
        raise PlanError(f"--topology={name!r}: unknown TPU generation {gen!r}; known: "
                        f"{sorted(CHIPS)}")
    if "x" in rest:
        dims = [int(x) for x in rest.split("x")]
        return gen, f"{gen}:{rest}", math.prod(dims)
    if not rest.isdigit() or int(rest) % CHIPS[gen].cores_in_name:
        raise PlanError(f"--topology={name!r}: the size must be a whole number of chips")
    chips = int(rest) // CHIPS[gen].cores_in_name
    if chips & (chips - 1):
        raise PlanError(f"--topology={name!r}: slices have a power-of-two chip count")
    return gen, f"{gen}:{_grid(chips, CHIPS[gen].torus_dims)}", chips


def slice_name(gen: str, chips: int) -> str:
    """The accelerator type Cloud TPU sells for `chips` chips (v5e-256, v4-128, v5p-512)."""
    return f"{gen}-{chips * CHIPS[gen].cores_in_name}"


def topology_devices(name: str) -> tuple[str, list[Any]]:
    """(generation, the slice's devices) from libtpu's topology description; no TPU needed."""
    gen, topo, chips = parse_topology(name)
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError(INSTALL_HINT)
    from jax.experimental import topologies

    # Compile-only: no chip is opened, so several planners (or tests) may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not platforms.tpu_chips():
        # libtpu, loaded as a compiler, still asks which TPU host it is on and prints a warning
        # (and with no worker list an error trace) when there is none. The answers describe
        # the attached host only: with and without TPU_ACCELERATOR_TYPE the slice's devices
        # (v5e-1/4/256, v4-8/16, v5p-8/512) and compiled programs (a sharded step on v5e-256,
        # v4-16, v5p-8) were identical, libtpu 0.0.42.1.
        # On a TPU VM they would contradict the real host, so there libtpu finds its own.
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
    kw: dict[str, Any] = {"chip_config_name": "megacore"} if CHIPS[gen].megacore else {}
    if CHIPS[gen].torus_dims == 2 and chips < 4:  # v5litepod-1: one chip, below a 2x2 host
        kw["chips_per_host_bounds"] = (*map(int, topo.split(":")[1].split("x")), 1)
    try:
        desc = topologies.get_topology_desc(topology_name=topo, platform="tpu", **kw)
    except Exception as e:  # libtpu's own message names what it did not accept
        raise PlanError(f"--topology={name!r} ({topo}): libtpu refused it: {e}") from e
    devices = list(desc.devices)
    if len(devices) != chips:
        raise PlanError(f"--topology={name!r}: libtpu gave {len(devices)} devices for {topo}, "
                        f"expected {chips}")
    return gen, devices
