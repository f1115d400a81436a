"""Token samplers: greedy, temperature, top-k, top-p, min-p, repetition and presence penalties.

Every setting is an array with one value per batch row, so one compiled decoding step
serves any mix of settings (the serving engine batches requests with different ones).
Filters run in the usual order: penalties, temperature, top-k, top-p, min-p, then a draw.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import DecodeConfig

_NEG = -1e30


@flax.struct.dataclass
class SamplingParams:
    """Per-row sampler settings, each of shape [B]. temperature 0 means greedy."""

    temperature: jax.Array
    top_k: jax.Array  # 0 disables
    top_p: jax.Array  # 1 disables
    min_p: jax.Array  # 0 disables
    repetition_penalty: jax.Array  # 1 disables
    presence_penalty: jax.Array  # 0 disables

    @classmethod
    def from_config(cls, decode: DecodeConfig, batch: int) -> "SamplingParams":
        return cls.make(
            batch,
            temperature=decode.temperature,
            top_k=decode.top_k,
            top_p=decode.top_p,
            min_p=decode.min_p,
            repetition_penalty=decode.repetition_penalty,
            presence_penalty=decode.presence_penalty,
        )

    @classmethod
    def make(cls, batch: int, **settings) -> "SamplingParams":
        """Validated settings broadcast to [batch]; unknown names and bad values raise."""
        arrays = cls.checked(batch, **settings)
        return cls(**{name: jnp.asarray(a, jnp.int32 if name == "top_k" else jnp.float32) for name, a in arrays.items()})

    @staticmethod
    def checked(batch: int, **settings) -> dict[str, np.ndarray]:
        """`make`'s validation alone, on the host: every setting as a [batch] numpy array."""
        defaults = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0)
        unknown = set(settings) - set(defaults)
        if unknown:
            raise ValueError(f"unknown sampling settings {sorted(unknown)}; valid: {sorted(defaults)}")
        arrays = {}
        for name, value in {**defaults, **settings}.items():
            try:
                arrays[name] = np.broadcast_to(np.asarray(value), (batch,))
            except ValueError:
                raise ValueError(f"sampling setting {name} has shape {np.shape(value)}, not () or ({batch},)") from None
        # DecodeConfig holds the validation rules; apply them to every row's values.
        for i in range(batch):
            DecodeConfig(**{name: a[i].item() for name, a in arrays.items()})
        return arrays


def apply_penalties(logits_BV, counts_BV, sp: SamplingParams):
    """CTRL-style repetition penalty and OpenAI-style presence penalty on tokens seen so far."""
    seen = counts_BV > 0
    rep = sp.repetition_penalty[:, None]
    penalised = jnp.where(logits_BV > 0, logits_BV / rep, logits_BV * rep)
    logits_BV = jnp.where(seen, penalised, logits_BV)
    return logits_BV - sp.presence_penalty[:, None] * seen


def filter_logits(logits_BV, sp: SamplingParams):
    """Temperature-scaled logits with everything outside top-k / top-p / min-p set to -inf.

    Top-k and top-p need the logits sorted, which XLA:CPU does slowly (~15 ms for 8 rows of
    8,192); a batch in which no row uses either skips the sort. A row with both disabled
    keeps every token either way, so its result does not depend on the other rows.
    """
    temperature = jnp.where(sp.temperature > 0, sp.temperature, 1.0)[:, None]
    logits_BV = logits_BV / temperature
    V = logits_BV.shape[-1]
    k = jnp.where((sp.top_k > 0) & (sp.top_k < V), sp.top_k, V)

    def top_k_and_p():
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        kth_largest = jnp.take_along_axis(sorted_BV, (k - 1)[:, None], axis=-1)
        keep = logits_BV >= kth_largest
        # Nucleus: keep the smallest prefix of sorted tokens whose mass reaches top_p.
        sorted_probs = jax.nn.softmax(jnp.where(sorted_BV >= kth_largest, sorted_BV, _NEG), axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        n_keep = jnp.maximum(jnp.sum(mass_before < sp.top_p[:, None], axis=-1), 1)
        nucleus_floor = jnp.take_along_axis(sorted_BV, (n_keep - 1)[:, None], axis=-1)
        # top_p = 1 keeps everything, even where rounding puts the mass before a token at 1.
        return keep & ((sp.top_p[:, None] >= 1.0) | (logits_BV >= nucleus_floor))

    needs_sort = jnp.any((k < V) | (sp.top_p < 1.0))
    keep = jax.lax.cond(needs_sort, top_k_and_p, lambda: jnp.ones(logits_BV.shape, bool))
    probs = jax.nn.softmax(jnp.where(keep, logits_BV, _NEG), axis=-1)
    keep &= probs >= sp.min_p[:, None] * probs.max(axis=-1, keepdims=True)
    return jnp.where(keep, logits_BV, -jnp.inf)


def sample(logits_BV, key, sp: SamplingParams, counts_BV=None):
    """Next tokens [B]: argmax for rows with temperature 0, a filtered draw otherwise.

    `key` is one key for the batch, or a [B] array of keys, one per row, each row then
    drawing exactly what it would draw alone in a batch of one with its key (the serving
    engine's rows are independent requests). A batch with no row above temperature 0 makes
    no draw.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    if counts_BV is not None:
        logits_BV = apply_penalties(logits_BV, counts_BV, sp)
    greedy = jnp.argmax(logits_BV, axis=-1)

    def draw():
        filtered_BV = filter_logits(logits_BV, sp)
        if jnp.ndim(key) == 0:
            return jax.random.categorical(key, filtered_BV, axis=-1)
        return jax.vmap(lambda k, row_V: jax.random.categorical(k, row_V[None], axis=-1)[0])(key, filtered_BV)

    drawn = jax.lax.cond(jnp.any(sp.temperature > 0), draw, lambda: greedy)
    return jnp.where(sp.temperature > 0, drawn, greedy).astype(jnp.int32)
