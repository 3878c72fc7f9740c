"""Device mesh, shardings, and the host-local -> global batch helper.

Every device is data-parallel for the batch: the global batch is split over
all mesh axes in order. The class-centre table of the head is split over the
*head axes*, all mesh axes by default. Naming a subset (say ``("model",)`` on
a ``data x model`` mesh) keeps the table sharded inside each group of
``model`` devices and replicated across groups; each group then computes the
softmax of its own slice of the batch and the groups sum their centre
gradients, which trades table memory for a smaller embedding all-gather.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DEFAULT_MESH_SHAPE: Mapping[str, int] = {"data": -1}


def make_mesh(shape: Mapping[str, int] | Sequence[tuple[str, int]] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a mesh from ``{axis_name: size}``; one size may be -1 (the rest).

    Axes are ``Auto`` so that jit and shard_map place inputs themselves.
    """
    items = list((shape or DEFAULT_MESH_SHAPE).items() if isinstance(
        shape or DEFAULT_MESH_SHAPE, Mapping) else shape)
    if not items:
        raise ValueError("mesh shape needs at least one axis")
    devices = list(devices if devices is not None else jax.devices())
    names = tuple(name for name, _ in items)
    sizes = [int(size) for _, size in items]
    if len(set(names)) != len(names):
        raise ValueError(f"mesh axis names repeat: {names}")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {dict(items)}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh shape {dict(items)}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(
                f"mesh shape {dict(items)}: {len(devices)} devices are not divisible "
                f"by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh shape {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, "
            f"{len(devices)} are available")
    return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names),
                         devices=devices)


def resolve_head_axes(mesh: Mesh, head_axes: Sequence[str] | None = None) -> tuple[str, ...]:
    """The mesh axes the class table is sharded over (all of them by default)."""
    if head_axes is None:
        return tuple(mesh.axis_names)
    head_axes = tuple(head_axes)
    unknown = [a for a in head_axes if a not in mesh.axis_names]
    if unknown or not head_axes:
        raise ValueError(f"head axes {head_axes} must be a non-empty subset of the mesh "
                         f"axes {tuple(mesh.axis_names)}")
    # Keep mesh order so that gathers and shard indices agree everywhere.
    return tuple(a for a in mesh.axis_names if a in head_axes)


def axes_size(mesh: Mesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def table_sharding(mesh: Mesh, head_axes: Sequence[str]) -> NamedSharding:
    """Leading (class) dimension split over the head axes."""
    return NamedSharding(mesh, P(tuple(head_axes)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    n = mesh.size
    if global_batch < 1 or global_batch % n:
        raise ValueError(
            f"global batch size {global_batch} is not divisible by the {n} data-parallel "
            f"devices of mesh {dict(mesh.shape)}; choose a multiple of {n}")


def host_local_to_global(batch, mesh: Mesh):
    """Turns this process's slice of the batch (numpy, leading dim) into global arrays.

    Each process passes only the rows its own devices hold; the result is a
    ``jax.Array`` per leaf whose leading dimension is the global batch.
    """
    sharding = batch_sharding(mesh)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(one, batch)
