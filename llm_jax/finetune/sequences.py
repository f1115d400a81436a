"""Prompt + response sequences and what every alignment objective computes on them.

A `Sequences` batch holds rows of `prompt tokens, response tokens, padding`: row i's
response is `tokens[i, prompt_lengths[i]:lengths[i]]`. On such rows this module gives

    lm_forward             logits_BTV and the final hidden states hidden_BTD
    token_logprobs         log p(token t | tokens < t) for t = 1..T-1, as logp_BA
    response_logprob_sum   the summed log-probability of each row's response (DPO)
    scalar_head            a linear D -> 1 head (reward model, PPO value head)
    split_tuned            what trains: a PEFT model's (model.peft) own parameters, else all

Index convention ("actions"): logp_BA[:, a] scores token a + 1 from the logits at
position a, so A = T - 1 and the response tokens are actions prompt_length - 1 ..
length - 2; `action_mask` marks them.

Alignment runs deterministically (dropout off): PPO's importance ratios and DPO's
reference log-probabilities must score the very sequences that were sampled or stored.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_jax.config import ModelConfig, OptimConfig
from llm_jax.models import Transformer
from llm_jax.training.optimizer import make_optimizer
from llm_jax.training.step import TrainState


@flax.struct.dataclass
class Sequences:
    """Rows of prompt + response + right padding (numpy on the host, jax arrays in a step)."""

    tokens: Any  # [N, T] int32
    prompt_lengths: Any  # [N] int32, >= 1
    lengths: Any  # [N] int32, prompt + response tokens

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def rows(self, index) -> "Sequences":
        """The rows at `index` (an int array), on the host or in a step."""
        return jax.tree.map(lambda x: x[index], self)


def concat(a: Sequences, b: Sequences) -> Sequences:
    """Stack two batches of equal width row-wise (chosen on top of rejected, say)."""
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


def pack(prompts: list[list[int]], responses: list[list[int]], width: int, pad_id: int = 0) -> Sequences:
    """Host-side `Sequences` of `width` tokens from token-id prompts and responses."""
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not p:
            raise ValueError(f"row {i}: the prompt is empty; the first response token is scored given the prompt")
        if len(p) + len(r) > width:
            raise ValueError(f"row {i}: {len(p)} prompt + {len(r)} response tokens exceed the width {width}")
        tokens[i, : len(p) + len(r)] = list(p) + list(r)
    return Sequences(
        tokens=tokens,
        prompt_lengths=np.asarray([len(p) for p in prompts], np.int32),
        lengths=np.asarray([len(p) + len(r) for p, r in zip(prompts, responses)], np.int32),
    )


def map_rows(fn, data, batch_size: int):
    """`fn` over fixed-size row batches of `data` (a pytree of [N, ...] host arrays), concatenated.

    The last batch is filled up with copies of row 0 (and their results dropped), so `fn`
    compiles once whatever N is.
    """
    n = jax.tree.leaves(data)[0].shape[0]
    outputs = []
    for start in range(0, n, batch_size):
        index = np.arange(start, start + batch_size)
        index = np.where(index < n, index, 0)
        out = fn(jax.tree.map(lambda x: x[index], data))
        outputs.append(jax.tree.map(lambda y: np.asarray(y)[: min(batch_size, n - start)], out))
    return jax.tree.map(lambda *ys: np.concatenate(ys), *outputs)


def action_mask(seqs: Sequences) -> jax.Array:
    """[N, T-1] True where action a (predicting token a + 1) is a response token."""
    t = jnp.arange(1, seqs.tokens.shape[1])[None, :]
    return (t >= seqs.prompt_lengths[:, None]) & (t < seqs.lengths[:, None])


def lm_forward(params, cfg: ModelConfig, seqs: Sequences):
    """(logits_BTV, hidden_BTD) of the rows; padding is its own segment, so it is never seen.

    A prefix-LM (model.mask="prefix") sees the prompt bidirectionally, as `generate` does.
    """
    T = seqs.tokens.shape[1]
    valid_BT = jnp.arange(T)[None, :] < seqs.lengths[:, None]
    prompt_BT = jnp.arange(T)[None, :] < seqs.prompt_lengths[:, None]
    (logits_BTV, _), state = Transformer(cfg).apply(
        {"params": params},
        seqs.tokens,
        segment_ids_BT=valid_BT.astype(jnp.int32),
        prefix_mask_BT=prompt_BT if cfg.mask == "prefix" else None,
        mutable="intermediates",
    )
    (hidden_BTD,) = state["intermediates"]["final_hidden_BTD"]  # sow keeps a tuple
    return logits_BTV, hidden_BTD


def token_logprobs(logits_BTV, tokens_BT, temperature: float = 1.0):
    """[B, T-1] log-probabilities of tokens 1..T-1 under the (temperature-scaled) logits."""
    logits_BAV = logits_BTV[:, :-1].astype(jnp.float32) / temperature
    target_BA = jnp.take_along_axis(logits_BAV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    return target_BA - jax.nn.logsumexp(logits_BAV, axis=-1)


def response_logprob_sum(params, cfg: ModelConfig, seqs: Sequences):
    """[N] summed log-probability of each row's response given its prompt."""
    logits_BTV, _ = lm_forward(params, cfg, seqs)
    return jnp.sum(token_logprobs(logits_BTV, seqs.tokens) * action_mask(seqs), axis=-1)


def last_token_hidden(hidden_BTD, seqs: Sequences):
    """[B, D] the hidden state of each row's last real token (it has seen the whole row)."""
    return jnp.take_along_axis(hidden_BTD, (seqs.lengths - 1)[:, None, None], axis=1)[:, 0]


def pairwise_accuracy(margin_B):
    """Fraction of pairs ranked the right way (margin > 0), a tie counting half: chance is 0.5."""
    return jnp.mean((margin_B > 0) + 0.5 * (margin_B == 0))


# ------------------------------------------------------------------------ scalar heads


def init_scalar_head(d_model: int) -> dict:
    """A linear D -> 1 head, zero-initialised: rewards and values start at exactly 0."""
    return {"kernel": jnp.zeros((d_model,), jnp.float32), "bias": jnp.zeros((), jnp.float32)}


def scalar_head(head: dict, hidden_D):
    """hidden [..., D] -> scalar [...], in f32."""
    return jnp.einsum("...d,d->...", hidden_D.astype(jnp.float32), head["kernel"]) + head["bias"]


# ---------------------------------------------------------- parameter-efficient tuning


def split_tuned(params, cfg: ModelConfig):
    """(tuned, frozen) LM parameters: a PEFT model (`model.peft`) trains its method's own
    parameters only (LoRA factors, adapters, prefixes, soft prompts), so gradients and
    optimizer state exist for those alone; a plain model trains everything (frozen = {})."""
    if cfg.peft.method == "none":
        return params, {}
    from llm_jax.finetune import peft

    return peft.split(params, cfg)


def with_frozen(tuned, frozen):
    """The whole LM parameter tree from `split_tuned`'s halves."""
    if not frozen:
        return tuned
    from llm_jax.finetune import peft

    return peft.combine(tuned, frozen)


# ---------------------------------------------------------------------- optimizer step


@functools.lru_cache(maxsize=32)
def optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """`make_optimizer`, one object per (config, steps).

    A TrainState's `tx` is static, so it is part of every jitted step's cache key: runs with
    equal settings (a test and the CLI, say) then share their compiled steps.
    """
    return make_optimizer(cfg, total_steps)


def new_train_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """The training package's TrainState around a copy of any parameter tree (LM plus heads).

    A copy, because the steps donate their state: the caller's arrays (often also the
    frozen reference model) must outlive the first step.
    """
    params = jax.tree.map(jnp.copy, params)
    counter = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
    state = TrainState(step=counter(), params=params, opt_state=tx.init(params), rng=jax.random.key(seed),
                       skipped=counter(), bad_in_a_row=counter(), tx=tx)
    return committed_like(state, params)


def committed_like(tree, like):
    """`tree` committed to the device holding `like`, when that is a single device.

    Parameters restored by orbax are committed to a device, freshly made ones are not, and
    jit compiles each placement separately; committing the whole state (and the frozen
    reference) makes the first step's compile the only one, wherever the weights came from.
    """
    devices = {d for x in jax.tree.leaves(like) for d in x.devices()}
    return jax.device_put(tree, devices.pop()) if len(devices) == 1 else tree
