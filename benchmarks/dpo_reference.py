"""DPO step time: reference log-probabilities computed once up front (llm_jax) vs per step.

Both variants run the same jitted DPO update on the same batches of the same model; the
per-step variant also runs the frozen reference's forward pass inside every step (what
a DPO trainer without the precomputation does). The table reports the steady-state step
time of each, their ratio, and the one-off cost of scoring every pair under the
reference, with the number of steps after which it has paid for itself.

    python benchmarks/dpo_reference.py [--pairs 256] [--steps 20] [--d-model 256] [--layers 4] [--len 128]
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.finetune.align_config import ALIGN_OPTIM
from llm_jax.finetune.dpo import _pair_logprobs, dpo_loss, dpo_train_step, reference_logprobs
from llm_jax.finetune.preference import preference_data
from llm_jax.finetune.sequences import apply_gradients, new_train_state, optimizer
from llm_jax.models import init_params


@functools.partial(jax.jit, static_argnames=("model_cfg", "beta"), donate_argnums=0)
def per_step_reference_train_step(state, ref_params, chosen, rejected, *, model_cfg, beta):
    """The same update, with the reference scored inside the step."""
    ref_chosen, ref_rejected = _pair_logprobs(jax.lax.stop_gradient(ref_params), model_cfg, chosen, rejected)

    def loss_fn(params):
        policy = _pair_logprobs(params, model_cfg, chosen, rejected)
        return dpo_loss(*policy, ref_chosen, ref_rejected, beta)

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    return apply_gradients(state, grads, metrics["loss"])


def _time_steps(step, state, batches, steps):
    state, m = step(state, batches[0])  # compile + first step
    jax.block_until_ready(m)
    start = time.perf_counter()
    for i in range(steps):
        state, m = step(state, batches[(i + 1) % len(batches)])
    jax.block_until_ready(m)
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--len", type=int, default=128, help="tokens per prompt + response")
    args = p.parse_args()

    cfg = ModelConfig(vocab_size=1024, d_model=args.d_model, n_layers=args.layers, n_heads=max(1, args.d_model // 64),
                      d_ff=4 * args.d_model, max_seq_len=args.len)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    half = args.len // 2
    ids = lambda n: [list(rng.integers(2, cfg.vocab_size, size=n)) for _ in range(args.pairs)]  # noqa: E731
    data = preference_data(ids(half), ids(half), ids(half), max_len=args.len)
    tx = optimizer(ALIGN_OPTIM, args.steps + 1)

    start = time.perf_counter()
    ref_c, ref_r = reference_logprobs(params, cfg, data, batch_size=32)
    upfront = time.perf_counter() - start

    index = [np.arange(i, i + args.batch) % args.pairs for i in range(0, args.pairs, args.batch)]
    ours = [(data.rows(i), ref_c[i], ref_r[i]) for i in index]
    precomputed = lambda s, b: dpo_train_step(s, {}, b[0].chosen, b[0].rejected, b[1], b[2],  # noqa: E731
                                              model_cfg=cfg, beta=0.1)
    t_ours = _time_steps(precomputed, new_train_state(params, tx, 0), ours, args.steps)
    per_step = lambda s, b: per_step_reference_train_step(s, params, b[0].chosen, b[0].rejected,  # noqa: E731
                                                          model_cfg=cfg, beta=0.1)
    t_ref = _time_steps(per_step, new_train_state(params, tx, 0), ours, args.steps)

    print(f"DPO, {cfg.n_layers} layers x d_model {cfg.d_model}, {args.len} tokens, batch {args.batch} pairs, "
          f"{jax.devices()[0].platform} ({os.cpu_count()} cores)")
    print(f"{'variant':36s} {'ms / step':>10s} {'ratio':>7s}")
    print(f"{'reference scored inside each step':36s} {t_ref * 1e3:10.1f} {1.0:7.2f}")
    print(f"{'reference scored once (llm_jax)':36s} {t_ours * 1e3:10.1f} {t_ref / t_ours:7.2f}")
    saved = t_ref - t_ours
    print(f"one-off reference pass over {args.pairs} pairs: {upfront:.2f} s (compile included), repaid after "
          f"{upfront / saved:.0f} steps" if saved > 0 else "the precomputation saved nothing here")


if __name__ == "__main__":
    main()
