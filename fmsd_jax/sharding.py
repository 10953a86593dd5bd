"""Device mesh and array shardings (pjit = `jax.jit` with explicit shardings; no pmap).

The batch is split over every mesh axis; parameters are replicated over `data` and, when the
`fsdp` axis is larger than one, large weights are stored split along it and gathered layer by
layer where they are used (`vit.gather_weights` in the layer scan; the jitted steps are traced
under `vit.on_mesh`), so fsdp costs weight all-gathers and gradient reduce-scatters while the
activations stay split over the batch (FSDP).

Nothing here reads the host's devices unless no devices are given: the planner
(`fmsd_jax/plan.py`) builds meshes over a TPU topology's devices on a CPU machine with the same
functions a real run uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fmsd_jax.errors import BadInput
from fmsd_jax.model.vit import FSDP_AXIS

BATCH_AXES = ("data", FSDP_AXIS)
FSDP_MIN_SIZE = 2**18  # arrays smaller than this are cheaper replicated than gathered


def make_mesh(mesh_cfg: mlc.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: every device of this run).

    On TPU the device order follows the physical topology (jax's mesh_utils), so that the
    fsdp groups, which gather weights every layer, sit on neighbouring chips.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    fsdp = int(mesh_cfg.fsdp)
    data = int(mesh_cfg.data)
    if fsdp < 1 or n % fsdp:
        raise BadInput(f"config.mesh.fsdp={fsdp} does not divide the {n} available devices")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise BadInput(
            f"config.mesh.data={mesh_cfg.data} x config.mesh.fsdp={fsdp} = {data * fsdp} "
            f"devices, but {n} are available; set config.mesh.data=-1 to use all of them")
    if devices[0].platform == "tpu":
        grid = mesh_utils.create_device_mesh((data, fsdp), devices,
                                             allow_split_physical_axes=True)
    else:  # CPU/GPU: process-major order, so each process's batch rows are contiguous
        grid = np.asarray(devices).reshape(data, fsdp)
    return Mesh(grid, BATCH_AXES)


def num_processes(mesh: Mesh) -> int:
    """Hosts that own the mesh's devices (jax.process_count() of the run that uses it)."""
    return len({d.process_index for d in mesh.devices.flat})


def check_batch_fits(mesh: Mesh, batch_size: int, what: str = "config.train.batch_size") -> None:
    """Fail before compiling when the global batch cannot be split evenly."""
    n = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if batch_size % n:
        raise BadInput(
            f"{what}={batch_size} is not divisible by the {n} devices of the mesh "
            f"{dict(mesh.shape)}; choose a multiple of {n}")
    hosts = num_processes(mesh)
    if batch_size % hosts:
        raise BadInput(f"{what}={batch_size} is not divisible by the {hosts} processes")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_sharding(mesh: Mesh, x: Any) -> NamedSharding:
    """Replicate, or split the largest fsdp-divisible axis of a large array over `fsdp`."""
    fsdp = mesh.shape["fsdp"]
    shape = getattr(x, "shape", ())
    if fsdp == 1 or math.prod(shape) < FSDP_MIN_SIZE:
        return replicated(mesh)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
    return jax.tree.map(lambda x: param_sharding(mesh, x), tree)


def abstract_tree(mesh: Mesh, tree: Any) -> Any:
    """Shape, dtype and sharding of every leaf: the restore target for a checkpoint."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=param_sharding(mesh, x)), tree)


def shard_tree(mesh: Mesh, tree: Any) -> Any:
    return jax.device_put(tree, tree_shardings(mesh, tree))


def global_batch(mesh: Mesh, local: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict:
    """Assemble the global device batch from this process's share (multi-host safe)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]))
            for k in keys}
