"""Parallel strategies on one mesh: step time and per-device memory, and measured pipeline bubbles.

Part 1 trains the same model, batch and optimizer under each strategy (data, FSDP, ZeRO-1,
tensor, GPipe, circular pipeline, a 2x2x2 combination; one device as the reference) and
reports, per strategy: the steady step time, the per-device memory the compiler assigns
(`memory_analysis()` of the compiled step), the planner's estimate of it, and the first
loss (equal across strategies: they compute the same thing).

Part 2 measures the pipeline bubble: forward + backward through the pipelined layer stack
(shard_map + ppermute ring), against the same useful work with no schedule at all (each
stage runs its own layers over every microbatch back to back, no transfers, no waiting).
The measured bubble is the share of the pipelined time that is not that work:
1 - t_ideal / t_pipeline, bubble ticks plus transfers plus the schedule's bookkeeping,
against the theoretical idle share (P-1) / (R*M + P-1).

On simulated CPU devices (the default: 8 of them share this machine's cores) step times
compare layouts' overheads, not speedups; with accelerators they are the real thing.

    python benchmarks/parallel_strategies.py [--steps 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

if "jax" not in sys.modules and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec  # noqa: E402

from llm_jax.config import DataConfig, ExperimentConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from llm_jax.parallel import make_mesh, param_shardings, sharding_context  # noqa: E402
from llm_jax.parallel.pipeline import PipelineSchedule, pipeline_runner, run_pipeline  # noqa: E402
from llm_jax.parallel.aot import CompiledMemory  # noqa: E402
from llm_jax.parallel.planner import estimate_memory, format_bytes  # noqa: E402
from llm_jax.training.step import init_sharded_train_state, sharded_train_step  # noqa: E402

# 8 layers, heads and kv heads, so that every axis can take all 8 devices.
MODEL = ModelConfig(vocab_size=512, d_model=128, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=512, max_seq_len=128)
BATCH, SEQ = 16, 128

STRATEGIES = {
    "one device": MeshConfig(data=1),
    "data 8": MeshConfig(data=8),
    "fsdp 8 (ZeRO-3)": MeshConfig(data=1, fsdp=8),
    "ZeRO-1 8": MeshConfig(data=1, fsdp=8, shard_params=False),
    "tensor 8": MeshConfig(data=1, tensor=8),
    "pipeline 8 gpipe": MeshConfig(data=1, pipeline=8, pipeline_microbatches=8),
    "pipeline 4 circular x data 2": MeshConfig(data=2, pipeline=4, pipeline_schedule="circular",
                                               pipeline_microbatches=4, pipeline_repeats=2),
    "2x2x2 data x fsdp x tensor": MeshConfig(data=2, fsdp=2, tensor=2),
}


def experiment(mesh: MeshConfig) -> ExperimentConfig:
    return ExperimentConfig(name="bench", model=MODEL, mesh=mesh, optim=OptimConfig(lr=1e-3, warmup_steps=1),
                            data=DataConfig(seq_len=SEQ), train=TrainConfig(steps=100, batch_size=BATCH))


def batches(n: int):
    rng = np.random.default_rng(0)
    for _ in range(n):
        tokens = (rng.integers(0, MODEL.vocab_size, (BATCH, 1)) + np.arange(SEQ + 1)) % MODEL.vocab_size
        yield {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}


def run_strategy(name: str, mesh_cfg: MeshConfig, steps: int) -> dict:
    devices = jax.devices()[:1] if name == "one device" else jax.devices()
    cfg = experiment(mesh_cfg)
    mesh = make_mesh(mesh_cfg, devices=devices)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    runner = pipeline_runner(mesh, mesh_cfg, MODEL.n_layers, BATCH)
    with sharding_context(mesh):
        state = init_sharded_train_state(MODEL, cfg.optim, cfg.train.steps, jax.random.key(0), mesh,
                                         param_shardings(MODEL, mesh), shard_params=mesh_cfg.shard_params)
        step = sharded_train_step(state, rows, model_cfg=MODEL, layer_runner=runner)
        data = [jax.device_put(b, rows) for b in batches(steps + 2)]
        start = time.perf_counter()
        compiled = step.lower(state, data[0]).compile()
        compile_s = time.perf_counter() - start
        state, metrics = compiled(state, data[0])
        first_loss = float(metrics["loss"])
        state, metrics = compiled(state, data[1])  # warm
        jax.block_until_ready(metrics)
        times = []
        for batch in data[2:]:
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    memory = CompiledMemory.of(compiled)
    estimate = estimate_memory(cfg, len(devices))
    return {"strategy": name, "devices": len(devices), "step_ms": 1e3 * float(np.median(times)),
            "compile_s": compile_s, "compiled_bytes": memory.device_total, "estimated_bytes": estimate.device_total,
            "state_bytes": memory.arguments, "first_loss": first_loss}


# ------------------------------------------------------------------------------ bubbles


def _stack_setup(schedule: PipelineSchedule, micro_rows: int):
    """A data x pipeline mesh, the model's stacked layers, an input batch and its context."""
    from llm_jax.models import init_params
    from llm_jax.models.attention import AttentionContext, attention_mask
    from llm_jax.models.transformer import Block

    mesh = make_mesh(MeshConfig(data=jax.device_count() // schedule.stages, pipeline=schedule.stages))
    layers = init_params(MODEL, jax.random.key(0))["layers"]
    rows = micro_rows * schedule.microbatches * mesh.shape["data"]
    x = jax.random.normal(jax.random.key(1), (rows, SEQ, MODEL.d_model))
    q_pos = jnp.broadcast_to(jnp.arange(SEQ), (rows, SEQ))
    ctx = AttentionContext(q_pos=q_pos, mask=attention_mask(MODEL, q_pos, q_pos), bias=None, write_at=None)

    def block_fn(layer_params, x_BTD, ctx):
        return Block(MODEL).apply({"params": layer_params}, x_BTD, ctx)[0]

    return mesh, layers, x, ctx, block_fn


def _no_schedule(block_fn, layers, x_BTD, ctx, *, mesh, schedule: PipelineSchedule):
    """Every stage applies its own layers to every microbatch in turn: the useful work alone."""
    P, M = schedule.stages, schedule.microbatches
    staged = jax.tree.map(lambda a: a.reshape(P, -1, *a.shape[1:]), layers)  # [P, L/P, ...]
    split = lambda a: a.reshape(M, a.shape[0] // M, *a.shape[1:])  # noqa: E731

    def stage(staged_local, x_MbTD, ctx_M):
        params = jax.tree.map(lambda a: a[0], staged_local)

        def one_microbatch(total, inputs):
            x, ctx_m = inputs
            y, _ = jax.lax.scan(lambda h, layer: (block_fn(layer, h, ctx_m), None), x, params)
            return total + y.sum(), None

        total, _ = jax.lax.scan(one_microbatch, jnp.zeros((), x_MbTD.dtype), (x_MbTD, ctx_M))
        return jax.lax.psum(total, "pipeline")

    return jax.shard_map(stage, mesh=mesh, in_specs=(PartitionSpec("pipeline"), PartitionSpec(), PartitionSpec()),
                         out_specs=PartitionSpec(), axis_names=frozenset({"pipeline"}), check_vma=False,
                         )(staged, split(x_BTD), jax.tree.map(split, ctx))


def stack_time(schedule: PipelineSchedule, micro_rows: int, pipelined: bool, repeats: int = 3) -> float:
    """CPU seconds (best of `repeats`) of forward + backward through the layer stack, pipelined or not.

    CPU time of this process, not wall time: simulated devices compute bubble ticks like
    any other, so this counts the work each schedule really does, and other processes on
    the machine do not disturb it. On accelerators wall time is the right clock.
    """
    clock = time.process_time if jax.default_backend() == "cpu" else time.perf_counter
    mesh, layers, x, ctx, block_fn = _stack_setup(schedule, micro_rows)

    def loss(layers, x):
        if pipelined:
            return run_pipeline(block_fn, layers, x, ctx, mesh=mesh, schedule=schedule).sum()
        return _no_schedule(block_fn, layers, x, ctx, mesh=mesh, schedule=schedule)

    with sharding_context(mesh):
        grad = jax.jit(jax.grad(loss)).lower(layers, x).compile()
        jax.block_until_ready(grad(layers, x))
        times = []
        for _ in range(repeats):
            start = clock()
            jax.block_until_ready(grad(layers, x))
            times.append(clock() - start)
    return min(times)


def measure_bubbles(stages: int = 4, micro_rows: int = 1, counts=(4, 8, 16)) -> list[dict]:
    rows = []
    for schedule_name, repeats in (("gpipe", 1), ("circular", 2)):
        for m in counts:
            s = PipelineSchedule(stages=stages, microbatches=m, repeats=repeats)
            pipelined, ideal = stack_time(s, micro_rows, True), stack_time(s, micro_rows, False)
            rows.append({"schedule": schedule_name, "stages": stages, "repeats": repeats, "microbatches": m,
                         "pipelined_s": pipelined, "ideal_s": ideal, "bubble_measured": 1 - ideal / pipelined,
                         "bubble_theory": s.bubble_fraction})
            print(f"  {schedule_name} M={m}: pipelined {pipelined:.2f} s, no schedule {ideal:.2f} s", flush=True)
    return rows


def print_strategy_table(results: list[dict]) -> None:
    print("\n| strategy | step ms | compile s | memory/device (compiled) | planner estimate | est/compiled "
          "| state/device | first loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['strategy']} | {r['step_ms']:.1f} | {r['compile_s']:.1f} | {format_bytes(r['compiled_bytes'])} "
              f"| {format_bytes(r['estimated_bytes'])} | {r['estimated_bytes'] / r['compiled_bytes']:.2f} "
              f"| {format_bytes(r['state_bytes'])} | {r['first_loss']:.4f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per strategy")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--skip-bubbles", action="store_true")
    parser.add_argument("--skip-strategies", action="store_true")
    args = parser.parse_args()

    device = jax.devices()[0]
    print(f"{jax.device_count()} x {device.platform} ({device.device_kind}); model {MODEL.n_layers} layers, "
          f"d_model {MODEL.d_model}, batch {BATCH} x {SEQ} tokens, AdamW")
    results = []
    for name, mesh_cfg in ({} if args.skip_strategies else STRATEGIES).items():
        if name != "one device" and jax.device_count() < 8:
            print(f"  skipping {name}: needs 8 devices")
            continue
        results.append(run_strategy(name, mesh_cfg, args.steps))
        r = results[-1]
        print(f"  {name}: {r['step_ms']:.1f} ms/step, {format_bytes(r['compiled_bytes'])} per device", flush=True)

    if results:
        print_strategy_table(results)

    bubbles = []
    if not args.skip_bubbles and jax.device_count() >= 4:
        bubbles = measure_bubbles()
        print("\n| schedule | stages | repeats | microbatches | pipelined s | no schedule s | bubble measured "
              "| bubble theory |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for b in bubbles:
            print(f"| {b['schedule']} | {b['stages']} | {b['repeats']} | {b['microbatches']} "
                  f"| {b['pipelined_s']:.2f} | {b['ideal_s']:.2f} | {b['bubble_measured']:.1%} "
                  f"| {b['bubble_theory']:.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"devices": jax.device_count(), "platform": device.platform, "model": dataclasses.asdict(MODEL),
                       "strategies": results, "bubbles": bubbles}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
