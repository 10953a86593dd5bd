"""The device mesh, batch and parameter shardings, and FSDP's weight gathers: one home
for parallelism, imported by the model (its layer scan gathers FSDP-split weights) and by
every jitted step (`on_mesh`).

Mesh axes: ("data", "fsdp"). Batches split over both; weights of at least FSDP_MIN_SIZE
elements split along their largest dimension divisible by the fsdp size and are all-gathered
one layer at a time in the scan, so fsdp costs weight all-gathers and gradient
reduce-scatters while the batch stays split over every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fmsd_jax.errors import BadInput

FSDP_AXIS = "fsdp"  # the mesh axis that splits the weights


def fsdp_size() -> int:
    """Size of the `fsdp` axis of the mesh the program is traced under (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or FSDP_AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[FSDP_AXIS])


def gather_weights(tree: Any) -> Any:
    """A layer's weights replicated for use: FSDP's per-layer all-gather.

    Weights are stored split over the `fsdp` mesh axis (`param_sharding`). Left to
    itself, XLA keeps a split weight in place and instead moves the activations: for a weight
    split on the axis the matmul contracts, an all-reduce of every layer's activations
    (DESIGN.md §6). Constraining each layer's weights to be replicated where they are used
    makes the cost a weight all-gather per layer (forward, and again in the backward, where
    remat recomputes it) while activations stay split over the batch. The gradient is left
    unconstrained, so XLA sums it straight into the split layout (a reduce-scatter).
    A no-op unless the program is traced under a mesh whose fsdp axis is larger than one
    (`on_mesh`): single-device and data-only programs are unchanged.
    """
    if fsdp_size() == 1:
        return tree
    return jax.tree.map(_replicate, tree)


@jax.custom_vjp
def _replicate(w: jax.Array) -> jax.Array:
    return jax.lax.with_sharding_constraint(w, P())


_replicate.defvjp(lambda w: (_replicate(w), None), lambda _, g: (g,))


def on_mesh(fn: Callable, mesh: Any) -> Callable:
    """`fn`, traced with `mesh` as the context mesh: what lets `gather_weights` act.

    Wrap the function handed to jax.jit (the train step, the evaluation step, the mask
    estimator's update); None: `fn` unchanged."""
    if mesh is None:
        return fn

    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced

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
