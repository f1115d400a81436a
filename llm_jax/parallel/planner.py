"""Memory planning: what a training step needs on each device, before any job starts.

`estimate_memory` adds up, per device:

    params       every parameter's shard under the mesh and rules (ZeRO-1: unsplit over fsdp)
    gradients    shaped and split like the parameters (twice that with gradient accumulation:
                 the microbatch's gradients plus the running sum)
    optimizer    the optimizer state's shards (Adam's moments follow their parameter); with
                 `mesh.offload_optimizer` it lives in pinned host memory but visits the device
                 for the update, after the backward pass has freed the activations, so only
                 what it needs beyond the activations' bytes counts
    activations  what the backward pass keeps: the residuals JAX saves for one layer under
                 the remat policy, times the layers this device runs, plus the output head's,
                 plus the working set of one layer's backward (its full residuals, which remat
                 recomputes); residuals offloaded by the policy count as host bytes

The residuals are JAX's own: `jax.vjp` of one block, traced with `jax.eval_shape` (nothing
runs), keeps exactly what the backward pass will read. It is traced at 1 and 2 rows, which
tells the batch axes apart, and scaled to this device's rows; the tensor axis then divides
the residuals that have a heads, MLP or vocabulary axis. This counts what JAX asks to
keep, not XLA's own scratch, so expect the compiler's figure to differ by some percent
(`benchmarks/README.md` records how much, per strategy).

`llm_jax.parallel.aot` compiles the real step ahead of time, so the compiler's
`memory_analysis()` checks the estimate. `propose` searches meshes, remat policies and
microbatch counts for settings that fit a device memory.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import TYPE_CHECKING, Iterable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from llm_jax.config import ConfigError, ExperimentConfig, MeshConfig
from llm_jax.models.layers import leading_axes_kept
from llm_jax.parallel.mesh import MESH_AXES, mesh_shape
from llm_jax.parallel.pipeline import PipelineSchedule

if TYPE_CHECKING:
    from llm_jax.parallel.aot import CompiledMemory

GiB = 1024**3
# Fraction of a device's memory a plan may fill: XLA's own scratch, fragmentation and the
# runtime need the rest.
DEFAULT_HEADROOM = 0.9


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device; `host` is what offloading parks in pinned host memory instead."""

    params: int
    gradients: int
    optimizer: int
    activations: int
    host: int = 0

    @property
    def device_total(self) -> int:
        return self.params + self.gradients + self.optimizer + self.activations

    def rows(self) -> list[tuple[str, int]]:
        return [("params", self.params), ("gradients", self.gradients), ("optimizer state", self.optimizer),
                ("activations", self.activations), ("device total", self.device_total), ("host (offloaded)", self.host)]


# ------------------------------------------------------------------------------ layout


def check_layout(cfg: ExperimentConfig, n_devices: int) -> dict[str, int]:
    """The mesh's axis sizes, after refusing every layout that cannot work (before compiling).

    A mesh that does not multiply to the device count, a batch the data axes cannot split,
    a model axis the tensor axis cannot split, or layers the pipeline cannot cut: each is a
    ValueError naming the sizes that clash.
    """
    sizes = mesh_shape(cfg.mesh, n_devices)
    rows = sizes["data"] * sizes["fsdp"]
    micro = cfg.train.batch_size // cfg.train.microbatches
    if micro % rows:
        fits = [m for m in range(1, cfg.train.batch_size + 1)
                if cfg.train.batch_size % m == 0 and (cfg.train.batch_size // m) % rows == 0]
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} with train.microbatches={cfg.train.microbatches} gives "
            f"{micro} rows per microbatch, which mesh.data x mesh.fsdp = {sizes['data']} x {sizes['fsdp']} = "
            f"{rows} devices cannot split evenly; microbatch counts that fit: {fits or 'none'}")
    if sizes["pipeline"] > 1:
        m = cfg.model
        if not m.scan_layers or m.dropout > 0 or m.attention_dropout > 0:
            raise ConfigError(f"mesh.pipeline={sizes['pipeline']} needs model.scan_layers=true and no dropout "
                              f"(model.scan_layers={m.scan_layers}, model.dropout={m.dropout}, "
                              f"model.attention_dropout={m.attention_dropout})")
        _schedule(cfg, sizes).check(cfg.model.n_layers, micro)
    _param_shardings(cfg.model, tuple(sizes.items()))  # checks every parameter axis against the mesh
    return sizes


def _abstract_mesh(sizes: Mapping[str, int]) -> AbstractMesh:
    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


def _schedule(cfg: ExperimentConfig, sizes: Mapping[str, int]) -> PipelineSchedule:
    stages = sizes["pipeline"]
    return PipelineSchedule(stages=stages, microbatches=cfg.mesh.pipeline_microbatches or 2 * stages,
                            repeats=cfg.mesh.pipeline_repeats if cfg.mesh.pipeline_schedule == "circular" else 1)


# ---------------------------------------------------------------------------- estimate


def _bytes_per_device(abstract_tree, shardings) -> int:
    shards = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
    return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
               for a, s in zip(jax.tree.leaves(abstract_tree), shards))


# Cached: the planner's search asks the same questions of many candidate layouts.
@functools.lru_cache(maxsize=32)
def _param_layout(model_cfg):
    """Abstract parameters and their logical axes (traced once per model)."""
    from llm_jax.models import abstract_params, param_logical_axes

    return abstract_params(model_cfg), param_logical_axes(model_cfg)


def _param_shardings(model_cfg, sizes: tuple[tuple[str, int], ...]):
    """`rules.param_shardings` on an abstract mesh of these sizes, raising its errors."""
    result = _cached_param_shardings(dataclasses.replace(model_cfg, remat="none"), sizes)
    if isinstance(result, Exception):
        raise result
    return result


@functools.lru_cache(maxsize=512)
def _cached_param_shardings(model_cfg, sizes):
    from llm_jax.parallel.rules import DEFAULT_RULES, _mesh_spec

    shapes, logical = _param_layout(model_cfg)
    mesh = _abstract_mesh(dict(sizes))

    def one(path, shape, spec):
        return NamedSharding(mesh, _mesh_spec(jax.tree_util.keystr(path), spec, shape.shape, mesh, DEFAULT_RULES))

    try:
        return jax.tree_util.tree_map_with_path(one, shapes, logical,
                                                is_leaf=lambda x: isinstance(x, PartitionSpec))
    except ValueError as e:
        return e


@functools.lru_cache(maxsize=32)
def _abstract_state(model_cfg, optim_cfg, steps: int):
    from llm_jax.training.step import init_train_state

    return jax.eval_shape(functools.partial(init_train_state, model_cfg, optim_cfg, steps), jax.random.key(0))


def state_shardings(model_cfg, optim_cfg, steps: int, shard_params: bool, mesh):
    """The abstract train state and its shardings on `mesh` (an AbstractMesh will do)."""
    from llm_jax.training.step import train_state_shardings

    abstract = _abstract_state(_without_remat(model_cfg), optim_cfg, steps)
    replicated = NamedSharding(mesh, PartitionSpec())
    params = _param_shardings(model_cfg, tuple(mesh.shape.items()))
    if not isinstance(mesh, AbstractMesh):  # the same specs on the real devices
        params = jax.tree.map(lambda s: NamedSharding(mesh, s.spec), params)
    shardings = train_state_shardings(abstract, params, replicated, shard_params)
    return abstract, shardings


@functools.lru_cache(maxsize=512)
def _abstract_state_shardings(model_cfg, optim_cfg, steps: int, shard_params: bool, sizes):
    return state_shardings(model_cfg, optim_cfg, steps, shard_params, _abstract_mesh(dict(sizes)))


def estimate_memory(cfg: ExperimentConfig, n_devices: int) -> MemoryEstimate:
    """Per-device bytes of one training step of `cfg` on `n_devices` (see the module docstring)."""
    sizes = check_layout(cfg, n_devices)
    abstract, shardings = _abstract_state_shardings(cfg.model, cfg.optim, cfg.train.steps, cfg.mesh.shard_params,
                                                    tuple(sizes.items()))
    params = _bytes_per_device(abstract.params, shardings.params)
    optimizer = _bytes_per_device(abstract.opt_state, shardings.opt_state)
    gradients = params * (2 if cfg.train.microbatches > 1 else 1)
    device_acts, host_acts = _activations(cfg, sizes)
    if not cfg.mesh.offload_optimizer:
        return MemoryEstimate(params=params, gradients=gradients, optimizer=optimizer, activations=device_acts,
                              host=host_acts)
    return MemoryEstimate(params=params, gradients=gradients, optimizer=max(0, optimizer - device_acts),
                          activations=device_acts, host=host_acts + optimizer)


def _activations(cfg: ExperimentConfig, sizes: Mapping[str, int]) -> tuple[int, int]:
    """(device, host) bytes the backward pass keeps, on one device."""
    model, tensor = cfg.model, sizes["tensor"]
    rows = cfg.train.batch_size // cfg.train.microbatches // (sizes["data"] * sizes["fsdp"])
    T = cfg.data.seq_len
    head_residuals = _at_rows(_head_residuals, rows, _without_remat(model), T)
    head = sum(_split(shape, model, tensor) * itemsize for shape, itemsize, _ in head_residuals)
    if sizes["pipeline"] == 1:
        device, host = _layer_bytes(model, model.remat, rows, T, tensor)
        return model.n_layers * device + _working_set(model, rows, T, tensor) + head, model.n_layers * host
    # Pipelined: each tick runs one chunk of layers on a microbatch, and autodiff of the
    # tick loop keeps every tick's residuals, bubble ticks included (their inputs are
    # placeholders, but they are computed all the same).
    schedule = _schedule(cfg, sizes)
    # A pipeline microbatch smaller than the data axes is padded up to one row per device.
    micro_rows = max(1, -(-rows // schedule.microbatches))
    chunk = model.n_layers // (schedule.stages * schedule.repeats)
    device, host = _layer_bytes(model, model.remat, micro_rows, T, tensor)
    # The backward of one tick works on that tick's residuals, sliced out of the stack.
    working = chunk * _layer_bytes(model, "none", micro_rows, T, tensor)[0]
    ticks = schedule.ticks
    return ticks * chunk * device + working + head, ticks * chunk * host


def _without_remat(model_cfg):
    """The cache key for residual traces: the policy is passed separately."""
    return dataclasses.replace(model_cfg, remat="none")


def _working_set(model_cfg, rows: int, T: int, tensor: int) -> int:
    """Remat recomputes one layer at a time in the backward pass: its full residuals."""
    return 0 if model_cfg.remat == "none" else _layer_bytes(model_cfg, "none", rows, T, tensor)[0]


def _activation_dtype(model_cfg):
    from llm_jax.models.layers import compute_dtype

    return compute_dtype(model_cfg)


def _split(shape: tuple[int, ...], model_cfg, tensor: int) -> int:
    """Elements of one residual that one device of the tensor axis holds.

    Residual layouts follow the model: [B,T,N,H] and [B,T,K,G,H] (heads at axis 2),
    [B,K,G,T,S] (scores), [B,T,F] (MLP) and [B,T,V] (logits) are split over `tensor`;
    the residual stream [B,T,D] and per-token statistics are not.
    """
    size = math.prod(shape)
    if tensor == 1 or len(shape) < 3:
        return size
    heads = {model_cfg.n_heads, model_cfg.kv_heads}
    split = (len(shape) >= 4 and shape[2] in heads) or (len(shape) == 5 and shape[1] in heads)
    split = split or (len(shape) == 3 and shape[2] in (model_cfg.d_ff, model_cfg.vocab_size)
                      and shape[2] != model_cfg.d_model)
    return size // tensor if split else size


@functools.lru_cache(maxsize=256)
def _layer_residuals(model_cfg, policy: str, T: int, rows: int) -> tuple:
    """(shape, itemsize, on_host) of what the backward pass keeps from one block of `rows` rows."""
    from llm_jax.models.attention import AttentionContext, attention_mask
    from llm_jax.models.transformer import REMAT_POLICIES, Block

    dtype = _activation_dtype(model_cfg)
    x = jax.ShapeDtypeStruct((rows, T, model_cfg.d_model), dtype)
    found = []

    def probe(x_BTD):
        q_pos = jnp.broadcast_to(jnp.arange(T), (rows, T))
        ctx = AttentionContext(q_pos=q_pos, mask=attention_mask(model_cfg, q_pos, q_pos), bias=None, write_at=None)
        params = Block(model_cfg).init(jax.random.key(0), x_BTD, ctx)["params"]
        block = lambda p, x: Block(model_cfg).apply({"params": p}, x, ctx)[0]  # noqa: E731
        if policy != "none":
            block = jax.checkpoint(block, policy=REMAT_POLICIES[policy])
        _, vjp_fn = jax.vjp(block, params, x_BTD)
        shared = {id(a) for a in jax.tree.leaves((params, ctx))}  # parameters and context are not per layer
        for r in jax.tree.leaves(vjp_fn):
            if id(r) not in shared:
                on_host = "host" in str(getattr(r.aval, "memory_space", "")).lower()
                found.append((tuple(r.shape), r.dtype.itemsize, on_host))
        return x_BTD

    with leading_axes_kept():
        jax.eval_shape(probe, x)
    return tuple(found)


def _at_rows(trace, rows: int, *args) -> list[tuple]:
    """A residual trace at `rows` rows, from traces at 1 and 2 rows (traced once per model).

    Every residual is batch-leading or batch-free, so the axes that change between the two
    traces are the batch axes, and the rest are the same at any row count.
    """
    one, two = trace(*args, 1), trace(*args, 2)
    return [(tuple(rows if a != b else a for a, b in zip(s1, s2)), itemsize, on_host)
            for (s1, itemsize, on_host), (s2, _, _) in zip(one, two)]


def _layer_bytes(model_cfg, policy: str, rows: int, T: int, tensor: int) -> tuple[int, int]:
    device = host = 0
    for shape, itemsize, on_host in _at_rows(_layer_residuals, rows, _without_remat(model_cfg), policy, T):
        n = _split(shape, model_cfg, tensor) * itemsize
        host, device = (host + n, device) if on_host else (host, device + n)
    return device, host


@functools.lru_cache(maxsize=64)
def _head_residuals(model_cfg, T: int, rows: int) -> tuple:
    """(shape, itemsize, on_host) kept by the embedding, final norm, logits and loss."""
    from llm_jax.models import Transformer, abstract_params
    from llm_jax.training.losses import cross_entropy_loss

    skip_layers = lambda block_fn, layer_params, x_BTD, ctx: x_BTD  # noqa: E731
    cfg = dataclasses.replace(model_cfg, remat="none", scan_layers=True, dropout=0.0, attention_dropout=0.0)
    found = []

    def probe(params, tokens):
        def loss(p):
            logits, _ = Transformer(cfg, layer_runner=skip_layers).apply({"params": p}, tokens)
            return cross_entropy_loss(logits, tokens)[0]

        _, vjp_fn = jax.vjp(loss, params)
        shared = {id(a) for a in jax.tree.leaves((params, tokens))}
        found.extend((tuple(r.shape), r.dtype.itemsize, False) for r in jax.tree.leaves(vjp_fn) if id(r) not in shared)
        return tokens

    with leading_axes_kept():
        jax.eval_shape(probe, abstract_params(cfg), jax.ShapeDtypeStruct((rows, T), jnp.int32))
    return tuple(found)


# ----------------------------------------------------------------------------- propose


REMAT_BY_COST = ("none", "save_dots", "save_attention_mlp_out", "offload_attention_mlp_out", "full")


@dataclasses.dataclass(frozen=True)
class Proposal:
    mesh: dict[str, int]
    remat: str
    microbatches: int
    offload_optimizer: bool
    estimate: MemoryEstimate

    def overrides(self) -> list[str]:
        """The dotted overrides that select this plan."""
        out = [f"mesh.{a}={n}" for a, n in self.mesh.items()]
        out += [f"model.remat={self.remat}", f"train.microbatches={self.microbatches}"]
        return out + (["mesh.offload_optimizer=true"] if self.offload_optimizer else [])


def _factorizations(n: int, parts: int) -> Iterable[tuple[int, ...]]:
    if parts == 1:
        yield (n,)
        return
    for d in range(1, n + 1):
        if n % d == 0:
            for rest in _factorizations(n // d, parts - 1):
                yield (d,) + rest


def propose(cfg: ExperimentConfig, n_devices: int, device_bytes: int, *, headroom: float = DEFAULT_HEADROOM,
            limit: int = 5) -> list[Proposal]:
    """Settings that fit `device_bytes` per device, cheapest first.

    "Cheapest" prefers, in order: less recomputation (remat), no optimizer offload, fewer
    gradient-accumulation microbatches, then the mesh whose collectives are cheapest
    (data over fsdp over tensor over pipeline).
    """
    budget = int(device_bytes * headroom)
    fits = []
    for remat, offload, (data, fsdp, tensor, pipeline) in itertools.product(
            REMAT_BY_COST, (False, True), _factorizations(n_devices, 4)):
        mesh = MeshConfig(**{**dataclasses.asdict(cfg.mesh), "data": data, "fsdp": fsdp, "tensor": tensor,
                             "pipeline": pipeline, "offload_optimizer": offload})
        for micro in (m for m in range(1, cfg.train.batch_size + 1) if cfg.train.batch_size % m == 0):
            candidate = _replace(cfg, mesh=mesh, remat=remat, microbatches=micro)
            try:
                estimate = estimate_memory(candidate, n_devices)
            except ValueError:  # a layout this model or batch cannot take
                continue
            if estimate.device_total <= budget:
                sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "pipeline": pipeline}
                fits.append(Proposal(sizes, remat, micro, offload, estimate))
                break  # more microbatches only cost time
    key = lambda p: (REMAT_BY_COST.index(p.remat), p.offload_optimizer, p.microbatches,  # noqa: E731
                     p.mesh["pipeline"], p.mesh["tensor"], p.mesh["fsdp"])
    return sorted(fits, key=key)[:limit]


def _replace(cfg: ExperimentConfig, *, mesh: MeshConfig, remat: str, microbatches: int) -> ExperimentConfig:
    return dataclasses.replace(cfg, mesh=mesh, model=dataclasses.replace(cfg.model, remat=remat),
                               train=dataclasses.replace(cfg.train, microbatches=microbatches))


# ------------------------------------------------------------------------------ report


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": GiB, "gib": GiB, "t": 2**40, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'16GiB', '80GB', '512MiB', '1e9' -> bytes (K/M/G alone are binary, KB/MB/GB decimal)."""
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise ValueError(f"device memory {text!r} is not a size; write e.g. 16GiB, 80GB or 512MiB")
    return int(value * _UNITS[unit])


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def local_device_memory() -> int | None:
    """Bytes the first local device may allocate, where the backend says (GPUs, TPUs; not CPUs)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def describe(cfg: ExperimentConfig, n_devices: int) -> str:
    sizes = mesh_shape(cfg.mesh, n_devices)
    extras = [f"remat {cfg.model.remat}", f"microbatches {cfg.train.microbatches}"]
    if sizes["pipeline"] > 1:
        extras.append(f"{cfg.mesh.pipeline_schedule} schedule")
    if not cfg.mesh.shard_params:
        extras.append("ZeRO-1")
    if cfg.mesh.offload_optimizer:
        extras.append("optimizer state on host")
    return f"{n_devices} devices, mesh " + " ".join(f"{a}={n}" for a, n in sizes.items()) + ", " + ", ".join(extras)


def plan_report(cfg: ExperimentConfig, n_devices: int, device_bytes: int | None = None,
                compiled: CompiledMemory | None = None, headroom: float = DEFAULT_HEADROOM) -> tuple[str, bool]:
    """The plan as a table, and whether it fits `device_bytes` (True when no size is given)."""
    estimate = estimate_memory(cfg, n_devices)
    lines = [f"{cfg.name}: {describe(cfg, n_devices)}, batch {cfg.train.batch_size} x {cfg.data.seq_len} tokens",
             f"{'per device':20s} {'estimate':>12s}" + (f" {'compiled':>12s}" if compiled else "")]
    for name, value in estimate.rows():
        line = f"{name:20s} {format_bytes(value):>12s}"
        if compiled and name == "device total":
            ratio = estimate.device_total / max(compiled.device_total, 1)
            line += f" {format_bytes(compiled.device_total):>12s}   (estimate / compiled = {ratio:.2f})"
        lines.append(line)
    if compiled:
        lines.append(f"{'':20s} compiled: arguments {format_bytes(compiled.arguments)}, temporaries "
                     f"{format_bytes(compiled.temporaries)}, outputs {format_bytes(compiled.outputs)} "
                     f"({format_bytes(compiled.aliased)} written in place)")
    fits = True
    if device_bytes:
        needed = compiled.device_total if compiled else estimate.device_total
        fits = needed <= device_bytes * headroom
        verdict = "fits" if fits else "does NOT fit"
        lines.append(f"device memory {format_bytes(device_bytes)}: {verdict} ({needed / device_bytes:.0%} used, "
                     f"{headroom:.0%} allowed)")
    return "\n".join(lines), fits
