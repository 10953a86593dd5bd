"""Device mesh and array shardings (pjit = `jax.jit` with explicit shardings; no pmap).

The batch is split over every mesh axis; parameters are replicated over `data` and, when the
`fsdp` axis is larger than one, large weights are split along it (XLA gathers them where used).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fmsd_jax.errors import BadInput

BATCH_AXES = ("data", "fsdp")
FSDP_MIN_SIZE = 2**18  # arrays smaller than this are cheaper replicated than gathered


def make_mesh(mesh_cfg: mlc.ConfigDict) -> Mesh:
    n = jax.device_count()
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
    devices = np.asarray(jax.devices()).reshape(data, fsdp)
    return Mesh(devices, BATCH_AXES)


def check_batch_fits(mesh: Mesh, batch_size: int, what: str = "config.train.batch_size") -> None:
    """Fail before compiling when the global batch cannot be split evenly."""
    n = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if batch_size % n:
        raise BadInput(
            f"{what}={batch_size} is not divisible by the {n} devices of the mesh "
            f"{dict(mesh.shape)}; choose a multiple of {n}")
    if batch_size % jax.process_count():
        raise BadInput(
            f"{what}={batch_size} is not divisible by the {jax.process_count()} processes")


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
