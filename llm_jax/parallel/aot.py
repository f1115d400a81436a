"""Ahead-of-time compilation of the train step, so an OOM shows up before a job is launched.

`compile_train_step` lowers and compiles the real step against abstract inputs only
(`jax.ShapeDtypeStruct`s carrying the planned shardings) on a mesh of the local devices,
of N simulated CPU devices, or of a TPU topology that libtpu can describe without the
chips (`topology_devices`). `CompiledMemory` reads the compiler's per-device accounting,
which `llm-jax plan --compile` sets beside the planner's estimate.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from llm_jax.config import ExperimentConfig
from llm_jax.parallel.mesh import make_mesh
from llm_jax.parallel.offload import optimizer_state_on_host
from llm_jax.parallel.pipeline import pipeline_runner
from llm_jax.parallel.planner import check_layout, state_shardings
from llm_jax.parallel.rules import sharding_context


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """The compiler's per-device accounting of one compiled step (`memory_analysis()`)."""

    arguments: int  # the train state and the batch
    outputs: int
    aliased: int  # outputs written into donated arguments
    temporaries: int  # gradients, activations and XLA's scratch
    host: int  # arguments, outputs and temporaries in host memory, where the backend reports them

    @property
    def device_total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @classmethod
    def of(cls, compiled: jax.stages.Compiled) -> "CompiledMemory":
        m = compiled.memory_analysis()
        if m is None:
            raise ValueError(f"the {jax.default_backend()} backend reports no memory analysis for compiled code")
        host = m.host_argument_size_in_bytes + m.host_output_size_in_bytes + m.host_temp_size_in_bytes
        return cls(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
                   temporaries=m.temp_size_in_bytes, host=host)


def topology_devices(name: str, platform: str = "tpu") -> list:
    """Compile-only devices of a topology (e.g. "v5e:4x4") that libtpu can describe."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(name, platform).devices)
    except (RuntimeError, NotImplementedError) as e:
        raise ValueError(
            f"cannot describe the {platform} topology {name!r} on this machine ({e}); compile against simulated "
            f"CPU devices instead (llm-jax plan --compile --devices N)") from None


def local_devices(count: int | None = None) -> list:
    """The first `count` local devices (default all), refusing a count this machine lacks."""
    devices = jax.devices()
    if count is not None and len(devices) < count:
        raise ValueError(f"--devices {count}: only {len(devices)} {jax.default_backend()} devices here; on CPU "
                         f"start with XLA_FLAGS=--xla_force_host_platform_device_count={count}")
    return devices[:count]


def compile_train_step(cfg: ExperimentConfig, devices: Sequence | None = None) -> jax.stages.Compiled:
    """The train step of `cfg`, compiled ahead of time for `devices` from abstract inputs only.

    No parameter, optimizer state or batch is allocated, so a step too big for the devices
    fails (or reports its size) here rather than in a launched job.
    """
    from llm_jax.training.step import sharded_train_step

    devices = list(jax.devices() if devices is None else devices)
    check_layout(cfg, len(devices))
    mesh = make_mesh(cfg.mesh, devices=devices)
    micro = cfg.train.batch_size // cfg.train.microbatches
    runner = pipeline_runner(mesh, cfg.mesh, cfg.model.n_layers, micro)
    with sharding_context(mesh):
        abstract, shardings = state_shardings(cfg.model, cfg.optim, cfg.train.steps, cfg.mesh.shard_params, mesh)
        if cfg.mesh.offload_optimizer:
            shardings = optimizer_state_on_host(shardings)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        shape = (cfg.train.batch_size, cfg.data.seq_len)
        batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows) for k in ("inputs", "targets")}
        step = sharded_train_step(state, rows, model_cfg=cfg.model, microbatches=cfg.train.microbatches,
                                  z_loss=cfg.train.z_loss, layer_runner=runner)
        return step.lower(state, batch).compile()
