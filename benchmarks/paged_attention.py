"""The serving engine's decode step: JAX's Pallas paged-attention kernel against the XLA gather.

Two engines over the same random model: `EngineConfig(paged_attention="gather")` and
`paged_attention="pallas"`. The script first serves the same greedy requests with both (in
float32) and checks that they give the same tokens. Then it times the engine's jitted
decode call ([batch, 1] tokens, every row `--context` tokens deep, its pages scattered
over the pool) with each, and prints both times and their ratio.

On a GPU the kernel is compiled (Pallas on Triton) and the model computes in bfloat16. On
a CPU the kernel runs in Pallas' interpret mode, which checks the path end to end but says
nothing of its speed, and the default sizes shrink.

    python benchmarks/paged_attention.py [--batch 32] [--context 2048] [--layers 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.inference.engine import Engine, EngineConfig
from llm_jax.models import init_params

# (d_model, layers, heads, kv_heads, context, batch, dtype) by platform.
DEFAULTS = {"gpu": (1024, 8, 16, 4, 2048, 32, "bfloat16"), "cpu": (128, 2, 4, 2, 96, 4, "float32")}
KERNELS = ("gather", "pallas")


def model_config(args) -> ModelConfig:
    return ModelConfig(vocab_size=512, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.kv_heads, d_ff=4 * args.d_model, max_seq_len=2 * args.context,
                       dtype=args.dtype)


def same_tokens(params, cfg: ModelConfig, page_size: int) -> bool:
    """Greedy requests through both engines (float32): the same tokens, or the kernel path is wrong."""
    cfg = dataclasses.replace(cfg, dtype="float32")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (5, 40, 17, 70)]
    outputs = {}
    for kernel in KERNELS:
        engine = Engine(params, cfg, EngineConfig(max_batch=4, page_size=page_size, num_pages=64,
                                                  paged_attention=kernel))
        requests = [engine.submit(p, max_tokens=12, sampling={"temperature": 0.0}) for p in prompts]
        engine.run_until_idle()
        outputs[kernel] = [r.output for r in requests]
    return outputs["gather"] == outputs["pallas"]


def time_decode_call(params, cfg: ModelConfig, kernel: str, args) -> list[float]:
    """Seconds per decode call (median of `--repeats` timings of `--calls` calls each)."""
    pages_per_row = -(-(args.context + 1) // args.page_size)
    config = EngineConfig(max_batch=args.batch, page_size=args.page_size, num_pages=args.batch * pages_per_row + 1,
                          paged_attention=kernel)
    engine = Engine(params, cfg, config)
    rng = np.random.default_rng(0)
    engine.k_pool = jnp.asarray(rng.normal(size=engine.k_pool.shape), engine.k_pool.dtype)
    engine.v_pool = jnp.asarray(rng.normal(size=engine.v_pool.shape), engine.v_pool.dtype)
    n_pages = next(b for b in engine._page_buckets(1) if b >= pages_per_row)
    # Every row args.context tokens deep, its pages scattered over the pool.
    inputs = engine._call_inputs([], args.batch, 1, n_pages)
    inputs.table[:, :pages_per_row] = 1 + rng.permutation(args.batch * pages_per_row).reshape(args.batch,
                                                                                              pages_per_row)
    inputs.start[:], inputs.n_valid[:], inputs.slot[:] = args.context, 1, np.arange(args.batch)

    def call():  # the pools and counts are donated: the engine keeps each call's outputs for the next
        return engine._dispatch(inputs)[0]

    jax.block_until_ready(call())  # compile
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.calls):
            out = call()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / args.calls)
    return times


def main(argv=None) -> int:
    backend = jax.default_backend()
    d_model, layers, heads, kv_heads, context, batch, dtype = DEFAULTS.get(backend, DEFAULTS["cpu"])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=d_model)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--kv-heads", type=int, default=kv_heads)
    p.add_argument("--context", type=int, default=context, help="tokens already cached per row")
    p.add_argument("--batch", type=int, default=batch, help="rows of the decode call (engine max_batch)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default=dtype, choices=("float32", "bfloat16"))
    p.add_argument("--calls", type=int, default=20 if backend == "gpu" else 3)
    p.add_argument("--repeats", type=int, default=5 if backend == "gpu" else 2)
    p.add_argument("--json", default=None, help="write the settings and results here")
    args = p.parse_args(argv)
    for name in ("d_model", "layers", "heads", "kv_heads", "context", "batch", "page_size", "calls", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.d_model % args.heads or args.heads % args.kv_heads:
        p.error(f"--d-model ({args.d_model}) must divide by --heads ({args.heads}), and --heads by --kv-heads")

    cfg = model_config(args)
    params = init_params(cfg, jax.random.key(0))
    mode = "compiled" if backend == "gpu" else "interpret mode: a correctness run, not a speed measurement"
    print(f"{backend} ({jax.devices()[0].device_kind}); Pallas kernel {mode}", flush=True)
    print(f"model d_model {args.d_model}, {args.layers} layers, {args.heads} heads / {args.kv_heads} kv heads, "
          f"{args.dtype}; decode call [{args.batch}, 1] over {args.context} cached tokens per row, "
          f"pages of {args.page_size}", flush=True)
    agree = same_tokens(params, cfg, args.page_size)
    print(f"same greedy tokens from both engines: {agree}", flush=True)
    results = {kernel: time_decode_call(params, cfg, kernel, args) for kernel in KERNELS}
    medians = {kernel: statistics.median(t) for kernel, t in results.items()}
    for kernel in KERNELS:
        print(f"{kernel:7s} decode call {medians[kernel] * 1e3:9.3f} ms (median of {args.repeats})")
    ratio = medians["gather"] / medians["pallas"]
    print(f"gather / pallas time: {ratio:.2f}x" + ("" if backend == "gpu" else " (interpret mode: meaningless)"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(backend=backend, settings=vars(args), same_tokens=agree, seconds=results,
                           speedup=ratio), f, indent=2)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
