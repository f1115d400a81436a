"""A paged key/value cache: fixed-size pages from one preallocated pool, read through page tables.

    pool k, v:     [L, P, Z, K, H]   P pages of Z token slots per layer (page 0 is the null page)
    page_table:    [B, M] int32      row b's logical page j lives in pool page page_table[b, j]
    end:           [B] int32         tokens already cached per row; new tokens start there

Logical slot s of a row (its token at position s) is `page_table[b, s // Z]`, offset
`s % Z`. Attention gathers each row's M pages into a dense [B, M*Z, K, H] view (an XLA
gather; no Pallas kernel here), so the mask and position biases are exactly those of the
dense `KVCache`: key slot s holds position s, and slots past a row's length are in its
future and therefore invisible. Pages are handed out and taken back by the host (see
`llm_jax.inference.paged_cache`); the model only reads and writes through the table.

Unused table entries point at the null page, which absorbs writes that belong nowhere
(padding tokens, idle batch rows) and is only ever read at masked slots.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from llm_jax.config import ModelConfig
from llm_jax.models.layers import compute_dtype

NULL_PAGE = 0


@flax.struct.dataclass
class PagedWrite:
    """Where one forward pass writes and reads: the `write_at` of a paged AttentionContext."""

    slots_BT: jax.Array  # [B, T] flat pool slot (page * Z + offset) of each new token
    pages_BM: jax.Array  # [B, M] the page table, to gather each row's keys and values


@flax.struct.dataclass
class PagedKVCache:
    """The pool of every layer plus this batch's page tables; see the module docstring."""

    k: jax.Array
    v: jax.Array
    page_table: jax.Array
    end: jax.Array

    @staticmethod
    def init_pool(cfg: ModelConfig, num_pages: int, page_size: int, dtype=None) -> tuple[jax.Array, jax.Array]:
        """Zeroed (k, v) pools [L, num_pages, page_size, K, H]; page 0 is the null page."""
        if cfg.mask != "causal":
            raise ValueError(f"the paged cache serves causal decoders; model.mask={cfg.mask!r} is not supported")
        if num_pages < 2 or page_size < 1:
            raise ValueError(f"a page pool needs num_pages >= 2 (one is the null page) and page_size >= 1, "
                             f"got num_pages={num_pages}, page_size={page_size}")
        shape = (cfg.n_layers, num_pages, page_size, cfg.kv_heads, cfg.head_dim)
        dtype = compute_dtype(cfg) if dtype is None else dtype
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def max_len(self) -> int:
        return self.page_table.shape[1] * self.page_size

    @property
    def prefix(self) -> jax.Array:
        # Causal models only: no slot is ever a prefix-LM prefix token.
        return jnp.zeros((self.end.shape[0], self.max_len), bool)

    def layer_entries(self) -> tuple:
        return (self.k, self.v)

    def with_layer_entries(self, entries: tuple, end: jax.Array, prefix: jax.Array) -> "PagedKVCache":
        del prefix
        k, v = entries
        return self.replace(k=k, v=v, end=end)

    def write_plan(self, q_pos_BT: jax.Array) -> PagedWrite:
        """Pool slots for tokens at positions `q_pos_BT`; positions past the table go to the null page."""
        Z, M = self.page_size, self.page_table.shape[1]
        page_index = q_pos_BT // Z
        page = jnp.take_along_axis(self.page_table, jnp.minimum(page_index, M - 1), axis=1)
        page = jnp.where(page_index < M, page, NULL_PAGE)
        return PagedWrite(slots_BT=page * Z + q_pos_BT % Z, pages_BM=self.page_table)


def paged_update(kv, k_BTKH, v_BTKH, plan: PagedWrite, dtype):
    """Scatter the new keys/values into this layer's pool pages, then gather each row's pages.

    Returns (k_BSKH, v_BSKH, new_entry) like the dense cache update, with S = M * Z.
    """
    k_pool, v_pool = kv
    k_pool = _scatter(k_pool, k_BTKH, plan.slots_BT)
    v_pool = _scatter(v_pool, v_BTKH, plan.slots_BT)
    return _gather(k_pool, plan.pages_BM).astype(dtype), _gather(v_pool, plan.pages_BM).astype(dtype), (k_pool, v_pool)


def _scatter(pool_PZKH, new_BTKH, slots_BT):
    P, Z, K, H = pool_PZKH.shape
    flat = pool_PZKH.reshape(P * Z, K, H).at[slots_BT.reshape(-1)].set(new_BTKH.reshape(-1, K, H).astype(pool_PZKH.dtype))
    return flat.reshape(P, Z, K, H)


def _gather(pool_PZKH, pages_BM):
    B, M = pages_BM.shape
    _, Z, K, H = pool_PZKH.shape
    return pool_PZKH[pages_BM].reshape(B, M * Z, K, H)
