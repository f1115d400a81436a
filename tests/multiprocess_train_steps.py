"""Run by test_multiprocess.py in each of two processes; `train_losses` is also its reference.

Three train steps of a small model on a 4-device mesh (data=2, fsdp=2): spread over two
processes with two CPU devices each, or, as the reference, on four devices of the test
process itself. Every process feeds only its own rows of each global batch. Run as a
script, it joins the job its environment describes and prints the losses as JSON.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train_losses(devices=None) -> list[float]:
    """The three losses, on a data=2 x fsdp=2 mesh of `devices` (default: every device of the job)."""
    import jax
    import numpy as np

    from llm_jax.config import MeshConfig, ModelConfig, OptimConfig
    from llm_jax.parallel import make_mesh, param_shardings, sharding_context
    from llm_jax.training.step import init_sharded_train_state, sharded_train_step

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2), devices=devices)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with jax.default_matmul_precision("highest"), sharding_context(mesh):
        state = init_sharded_train_state(cfg, OptimConfig(lr=1e-2, warmup_steps=1), 10, jax.random.key(0), mesh,
                                         param_shardings(cfg, mesh))
        step = sharded_train_step(state, rows, model_cfg=cfg)
        rng = np.random.default_rng(0)
        losses = []
        for _ in range(3):
            tokens = (rng.integers(0, 64, (8, 1)) + np.arange(17)) % 64  # the same global batch everywhere
            n, i = jax.process_count(), jax.process_index()
            local = tokens[i * 8 // n:(i + 1) * 8 // n]
            batch = {"inputs": local[:, :-1], "targets": local[:, 1:]}
            batch = {k: jax.make_array_from_process_local_data(rows, v.astype(np.int32)) for k, v in batch.items()}
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    return losses


if __name__ == "__main__":
    from llm_jax.parallel.distributed import initialize_from_env

    initialize_from_env()  # before anything starts a JAX backend
    import jax

    losses = train_losses()
    print("LOSSES", json.dumps({"process": jax.process_index(), "count": jax.process_count(), "losses": losses}))
