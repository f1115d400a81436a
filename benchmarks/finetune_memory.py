"""Full fine-tuning vs LoRA vs QLoRA on one model: trainable parameters and per-device memory.

Each method's fine-tuning train step (`llm_jax.finetune.step`, AdamW, the same batch) is
compiled ahead of time for the same mesh from abstract inputs, so nothing is allocated
and any model size fits; XLA's `memory_analysis()` of the compiled step gives the bytes
per device of its arguments (parameters, optimizer state, batch), its temporaries
(activations, gradients) and its outputs. Outputs that reuse donated arguments are not
counted twice: peak = arguments + temporaries + outputs - aliased.

    python benchmarks/finetune_memory.py                       # a GPT-2-medium-sized Llama, 8 CPU devices
    python benchmarks/finetune_memory.py --d-model 512 --layers 4 --fsdp 1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys


def _setup_devices(n: int) -> None:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compiled_memory(cfg, mesh, batch: int, seq_len: int) -> dict:
    """Per-device bytes of one method's compiled train step, and its parameter counts."""
    import jax
    import jax.numpy as jnp

    from llm_jax.config import OptimConfig
    from llm_jax.finetune import peft
    from llm_jax.finetune import step as ft_step
    from llm_jax.models import abstract_params
    from llm_jax.models.lora import NF4Tensor
    from llm_jax.parallel.rules import param_shardings, sharding_context
    from llm_jax.training.step import train_state_shardings

    P = jax.sharding.PartitionSpec
    replicated = jax.sharding.NamedSharding(mesh, P())
    with sharding_context(mesh):
        tuned_sh, frozen_sh = peft.split(param_shardings(cfg, mesh), cfg)
        tuned, frozen = peft.split(abstract_params(cfg), cfg)
        if cfg.peft.method == "qlora":
            frozen = jax.eval_shape(lambda p: peft.quantize_base(p, cfg), frozen)
            frozen_sh = peft.frozen_shardings(frozen, frozen_sh)
        optim = OptimConfig(lr=1e-4, warmup_steps=10, weight_decay=0.0)
        state = jax.eval_shape(lambda t: ft_step.init_state(t, optim, 1000, jax.random.key(0)), tuned)
        state = _abstract(state, train_state_shardings(state, tuned_sh, replicated))
        frozen = _abstract(frozen, frozen_sh)
        rows = jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))
        tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=rows)
        batch_in = {"inputs": tokens, "targets": tokens}
        step = ft_step.sharded_train_step(state, frozen, rows, model_cfg=cfg)
        memory = step.lower(state, frozen, batch_in).compile().memory_analysis()
    n_tuned, n_total = peft.count_tuned(cfg)
    leaves = jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, NF4Tensor))
    frozen_bytes = sum(x.codes.size // 2 + x.scale.size * 4 if isinstance(x, NF4Tensor) else x.size * x.dtype.itemsize
                       for x in leaves)
    return {
        "tuned": n_tuned, "total": n_total, "frozen_bytes": frozen_bytes,
        "arguments": memory.argument_size_in_bytes, "temporaries": memory.temp_size_in_bytes,
        "outputs": memory.output_size_in_bytes, "aliased": memory.alias_size_in_bytes,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    ap.add_argument("--fsdp", type=int, default=8, help="devices the parameters are split over (simulated CPUs)")
    ap.add_argument("--lora-rank", type=int, default=16)
    args = ap.parse_args(argv)
    _setup_devices(args.fsdp)

    import jax

    from llm_jax.config import MeshConfig, PeftConfig
    from llm_jax.models.presets import llama
    from llm_jax.parallel.mesh import make_mesh

    base = llama(args.d_model, args.layers, args.heads, n_kv_heads=args.heads, d_ff=args.d_model * 8 // 3 // 64 * 64,
                 vocab_size=args.vocab, max_seq_len=args.seq_len, remat="full", dtype="bfloat16")
    mesh = make_mesh(MeshConfig(data=1, fsdp=args.fsdp))
    lora = PeftConfig(method="lora", lora_rank=args.lora_rank, lora_targets="all")
    methods = {
        "full fine-tuning": base,
        f"LoRA r={args.lora_rank} (all projections)": dataclasses.replace(base, peft=lora),
        f"QLoRA r={args.lora_rank} (NF4 base, group 64)": dataclasses.replace(
            base, peft=dataclasses.replace(lora, method="qlora")),
    }
    print(f"model: Llama-style, d_model {args.d_model}, {args.layers} layers, {args.heads} heads, vocabulary "
          f"{args.vocab}; batch {args.batch} x {args.seq_len} tokens, bf16 compute, full remat, AdamW; "
          f"{args.fsdp} {jax.devices()[0].platform} device(s), FSDP")
    header = (f"| method | trainable params | % of total | frozen weights (all devices) | per device: arguments | "
              f"temporaries | peak | vs full |")
    print(header)
    print("|" + " --- |" * 8)
    gib = 2**30
    full_peak = None
    for name, cfg in methods.items():
        m = compiled_memory(cfg, mesh, args.batch, args.seq_len)
        peak = m["arguments"] + m["temporaries"] + m["outputs"] - m["aliased"]
        full_peak = full_peak or peak
        print(f"| {name} | {m['tuned']:,} | {m['tuned'] / m['total']:.2%} | {m['frozen_bytes'] / gib:.2f} GiB | "
              f"{m['arguments'] / gib:.3f} GiB | {m['temporaries'] / gib:.3f} GiB | {peak / gib:.3f} GiB | "
              f"{peak / full_peak:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
