"""The device mesh: axes data, fsdp, tensor, pipeline, sized by `MeshConfig`."""

from __future__ import annotations

import math
from typing import Sequence

import jax

from llm_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "pipeline")


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Axis sizes with the -1 axis (if any) resolved; they must multiply to `n_devices`."""
    sizes = cfg.axis_sizes()
    fixed = math.prod(v for v in sizes.values() if v != -1)
    rest = [k for k, v in sizes.items() if v == -1]
    if rest:
        if n_devices % fixed:
            raise ValueError(
                f"mesh {sizes}: the fixed axes multiply to {fixed}, which does not divide the "
                f"{n_devices} devices, so mesh.{rest[0]}=-1 cannot take the rest"
            )
        sizes[rest[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(
            f"mesh {sizes} has {math.prod(sizes.values())} devices but {n_devices} are available; "
            f"set one axis to -1 to take the rest"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(
        tuple(shape[a] for a in MESH_AXES),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )
