"""Pipeline parallelism: the layer stack cut into stages over the mesh's `pipeline` axis.

The batch is split into M microbatches that flow through P stages; each stage runs its
share of the layers and passes activations to the next stage with `lax.ppermute`, all
inside one `jax.shard_map` that is manual over `pipeline` only (data, FSDP and tensor
sharding inside a stage stay automatic). Reverse-mode autodiff of the forward schedule
gives the backward schedule (gradients flow back through the transposed ppermutes).

Schedules, with R "repeats" (virtual stages per device):

    gpipe      R = 1: stage s holds layers [s*L/P, (s+1)*L/P); bubble (P-1) / (M+P-1)
    circular   R > 1: the stack is cut into P*R chunks, chunk k on stage k mod P, and each
               microbatch circles the ring R times; bubble (P-1) / (R*M+P-1), R times less
               idle work per step (needs M >= P so the ring never waits)

Every stage computes at every tick, so bubble ticks run on placeholder inputs and are
discarded; the bubble fraction is the share of such ticks. The embedding and the output
head run outside the pipeline, on every stage.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

AXIS = "pipeline"


@dataclasses.dataclass(frozen=True)
class PipelineSchedule:
    stages: int
    microbatches: int
    repeats: int = 1  # 1: GPipe; > 1: circular

    @property
    def ticks(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble_fraction(self) -> float:
        """Share of stage-ticks that do no useful work."""
        return (self.stages - 1) / self.ticks

    def check(self, n_layers: int, batch: int) -> None:
        """Refuse layer and batch sizes the schedule cannot split, naming what would fit."""
        chunks = self.stages * self.repeats
        if n_layers % chunks:
            fits = [d for d in range(1, n_layers + 1) if n_layers % (d * self.repeats) == 0]
            raise ValueError(f"model.n_layers={n_layers} cannot be cut into {self.stages} pipeline stages x "
                             f"{self.repeats} repeats = {chunks} equal chunks; pipeline sizes that fit: {fits}")
        if batch % self.microbatches:
            raise ValueError(f"a batch of {batch} rows cannot be split into {self.microbatches} pipeline "
                             f"microbatches; use a microbatch count that divides {batch}")
        if self.repeats > 1 and self.microbatches < self.stages:
            raise ValueError(f"the circular schedule needs at least as many microbatches ({self.microbatches}) "
                             f"as stages ({self.stages}), or a microbatch would wait on itself")


def run_pipeline(block_fn, layer_params, x_BTD, ctx, *, mesh: jax.sharding.Mesh, schedule: PipelineSchedule):
    """Apply the stacked layers [L, ...] to x through the pipeline; same result as a scan."""
    P, R, M = schedule.stages, schedule.repeats, schedule.microbatches
    L = jax.tree.leaves(layer_params)[0].shape[0]
    B = x_BTD.shape[0]
    schedule.check(L, B)
    if mesh.shape[AXIS] != P:
        raise ValueError(f"the schedule has {P} stages but the mesh's pipeline axis has {mesh.shape[AXIS]} devices")
    C = L // (P * R)
    # Layer (r*P + s)*C + c lives on stage s as [r, c]: [L, ...] -> [P, R, C, ...].
    staged = jax.tree.map(lambda a: a.reshape(R, P, C, *a.shape[1:]).swapaxes(0, 1), layer_params)
    split = lambda a: a.reshape(M, B // M, *a.shape[1:])  # noqa: E731
    ctx_M = jax.tree.map(split, ctx)  # every context array is batch-leading

    def stages_fn(staged_local, x_MbTD, ctx_M):
        params = jax.tree.map(lambda a: a[0], staged_local)  # this stage's [R, C, ...]
        return _stage_loop(block_fn, params, x_MbTD, ctx_M, schedule)

    out_MbTD = jax.shard_map(
        stages_fn, mesh=mesh, in_specs=(PartitionSpec(AXIS), PartitionSpec(), PartitionSpec()),
        out_specs=PartitionSpec(), axis_names=frozenset({AXIS}), check_vma=False,
    )(staged, split(x_BTD), ctx_M)
    return out_MbTD.reshape(x_BTD.shape)


def _stage_loop(block_fn, params, x_MbTD, ctx_M, schedule: PipelineSchedule):
    """One stage's view of the schedule: at tick t it works on its (t - stage)-th chunk-step."""
    P, R, M = schedule.stages, schedule.repeats, schedule.microbatches
    stage = jax.lax.axis_index(AXIS)
    ring = [(i, (i + 1) % P) for i in range(P)]

    def run_chunk(r, x_bTD, ctx_m):
        chunk = jax.tree.map(lambda a: a[r], params)  # [C, ...]
        x_bTD, _ = jax.lax.scan(lambda x, layer: (block_fn(layer, x, ctx_m), None), x_bTD, chunk)
        return x_bTD

    def tick(t, carry):
        received, circulating, out = carry
        u = t - stage  # this stage's step: microbatch u % M on repeat u // M
        active = (u >= 0) & (u < R * M)
        u = jnp.clip(u, 0, R * M - 1)
        r, m = u // M, u % M
        fresh = jnp.where(r == 0, x_MbTD[m], circulating[m])
        y = run_chunk(r, jnp.where(stage == 0, fresh, received), jax.tree.map(lambda a: a[m], ctx_M))
        out = jnp.where((stage == P - 1) & active & (r == R - 1), out.at[m].set(y), out)
        received = jax.lax.ppermute(y, AXIS, ring)
        # Stage 0 keeps what the last stage finished this tick for the microbatch's next lap.
        v = t - (P - 1)
        lap_done = (v >= 0) & (v < R * M)
        circulating = jnp.where((stage == 0) & lap_done, circulating.at[jnp.clip(v, 0) % M].set(received),
                                circulating)
        return received, circulating, out

    zeros = jnp.zeros_like(x_MbTD)
    _, _, out = jax.lax.fori_loop(0, schedule.ticks, tick, (zeros[0], zeros, zeros))
    # Only the last stage holds the outputs; share them so the head runs everywhere.
    return jax.lax.psum(jnp.where(stage == P - 1, out, 0), AXIS)


def pipeline_runner(mesh: jax.sharding.Mesh, mesh_cfg, n_layers: int, batch: int):
    """The model's `layer_runner` for this mesh and `MeshConfig`, or None without pipelining.

    Checks, before anything compiles, that `n_layers` and a (micro)batch of `batch` rows
    split evenly under the schedule.
    """
    stages = mesh.shape[AXIS]
    if stages == 1:
        return None
    schedule = PipelineSchedule(
        stages=stages,
        microbatches=mesh_cfg.pipeline_microbatches or 2 * stages,
        repeats=mesh_cfg.pipeline_repeats if mesh_cfg.pipeline_schedule == "circular" else 1,
    )
    schedule.check(n_layers, batch)
    return functools.partial(run_pipeline, mesh=mesh, schedule=schedule)
