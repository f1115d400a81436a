"""Run by test_multiprocess.py in each of two processes (or one, for the reference).

Three train steps of a small model on a 4-device mesh (data=2, fsdp=2): spread over two
processes with two CPU devices each, or within one process with four. Every process
feeds only its own rows of each global batch. Prints the losses as JSON.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llm_jax.parallel.distributed import initialize_from_env  # noqa: E402

initialize_from_env()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from llm_jax.config import MeshConfig, ModelConfig, OptimConfig  # noqa: E402
from llm_jax.parallel import make_mesh, param_shardings, sharding_context  # noqa: E402
from llm_jax.training.step import init_sharded_train_state, sharded_train_step  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
mesh = make_mesh(MeshConfig(data=2, fsdp=2))
rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
with sharding_context(mesh):
    state = init_sharded_train_state(CFG, OptimConfig(lr=1e-2, warmup_steps=1), 10, jax.random.key(0), mesh,
                                     param_shardings(CFG, mesh))
    step = sharded_train_step(state, rows, model_cfg=CFG)
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
print("LOSSES", json.dumps({"process": jax.process_index(), "count": jax.process_count(), "losses": losses}))
