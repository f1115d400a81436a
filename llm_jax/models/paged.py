"""A paged key/value cache: fixed-size pages from one preallocated pool, read through page tables.

    pool k, v:     [L, P, Z, K, H]   P pages of Z token slots per layer (page 0 is the null page)
    page_table:    [B, M] int32      row b's logical page j lives in pool page page_table[b, j]
    end:           [B] int32         tokens already cached per row; new tokens start there

Logical slot s of a row (its token at position s) is `page_table[b, s // Z]`, offset
`s % Z`. Attention gathers each row's M pages into a dense [B, M*Z, K, H] view (an XLA
gather; no Pallas kernel here), so the mask and position biases are exactly those of the
dense `KVCache`: key slot s holds position s, and slots past a row's length are in its
future and therefore invisible. Pages are handed out and taken back by the host (see
`llm_jax.inference.paged_cache`); the layers only read through the table, and the cache
scatters every layer's new keys and values into the pools once, after the last layer.

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
    """What attention needs to read a paged cache: the `write_at` of a paged AttentionContext.

    Layers read the pools, they never write them: each returns its new keys and values,
    and `PagedKVCache.with_layer_entries` scatters all layers' into the pools at once. So
    a step touches only the pages it reads, instead of passing the pools through the
    layer scan (which would copy them every step).
    """

    q_pos_BT: jax.Array  # [B, T] positions of the new tokens
    pages_BM: jax.Array  # [B, M] the page table
    k_pool: jax.Array  # [L, P, Z, K, H]
    v_pool: jax.Array


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
        """Each layer's entry is just its index into the pools (see PagedWrite)."""
        return (jnp.arange(self.k.shape[0]),)

    def with_layer_entries(self, entries: tuple, end: jax.Array, prefix: jax.Array) -> "PagedKVCache":
        """Scatter every layer's new keys/values [L, B, T, K, H] into the pools."""
        del prefix
        k_new, v_new = entries
        T = k_new.shape[2]
        slots_BT = self._slots(self.end[:, None] + jnp.arange(T)[None, :])
        return self.replace(k=_scatter(self.k, k_new, slots_BT), v=_scatter(self.v, v_new, slots_BT), end=end)

    def write_plan(self, q_pos_BT: jax.Array) -> PagedWrite:
        return PagedWrite(q_pos_BT=q_pos_BT, pages_BM=self.page_table, k_pool=self.k, v_pool=self.v)

    def _slots(self, q_pos_BT):
        """Flat pool slots (page * Z + offset) of positions; those past the table go to the null page."""
        Z, M = self.page_size, self.page_table.shape[1]
        page_index = q_pos_BT // Z
        page = jnp.take_along_axis(self.page_table, jnp.minimum(page_index, M - 1), axis=1)
        page = jnp.where(page_index < M, page, NULL_PAGE)
        return page * Z + q_pos_BT % Z


def paged_update(kv, k_BTKH, v_BTKH, plan: PagedWrite, dtype):
    """This layer's keys/values [B, M*Z, K, H] as read through the page table, new tokens included.

    Returns (k_BSKH, v_BSKH, (k_BTKH, v_BTKH)): the new entries go back to the cache,
    which writes them into the pools after the last layer.
    """
    (layer,) = kv
    k_BSKH = _read(plan.k_pool, layer, plan.pages_BM, plan.q_pos_BT, k_BTKH)
    v_BSKH = _read(plan.v_pool, layer, plan.pages_BM, plan.q_pos_BT, v_BTKH)
    return k_BSKH.astype(dtype), v_BSKH.astype(dtype), (k_BTKH, v_BTKH)


def _read(pool_LPZKH, layer, pages_BM, q_pos_BT, new_BTKH):
    _, _, Z, K, H = pool_LPZKH.shape
    B, M = pages_BM.shape
    view_BSKH = pool_LPZKH[layer, pages_BM].reshape(B, M * Z, K, H)  # one gather, no copy of the pool
    rows = jnp.arange(B)[:, None]
    # Positions past the table (padding of a row near the end of the context) are dropped.
    return view_BSKH.at[rows, q_pos_BT].set(new_BTKH.astype(view_BSKH.dtype), mode="drop")


def _scatter(pool_LPZKH, new_LBTKH, slots_BT):
    L, P, Z, K, H = pool_LPZKH.shape
    flat = pool_LPZKH.reshape(L, P * Z, K, H)
    flat = flat.at[:, slots_BT.reshape(-1)].set(new_LBTKH.reshape(L, -1, K, H).astype(flat.dtype))
    return flat.reshape(L, P, Z, K, H)
