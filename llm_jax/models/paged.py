"""A paged key/value cache: fixed-size pages from one preallocated pool, read through page tables.

    pool k, v:     [K, L, P, Z, H]   P pages of Z token slots per layer (page 0 is the null page),
                                     key/value-head major as the Pallas paged-attention kernels read them
    page_table:    [B, M] int32      row b's logical page j lives in pool page page_table[b, j]
    end:           [B] int32         tokens already cached per row; new tokens start there

Logical slot s of a row (its token at position s) is `page_table[b, s // Z]`, offset
`s % Z`. Pages are handed out and taken back by the host (see
`llm_jax.inference.paged_cache`). Attention reads through the table in one of two ways:

- **gather** (every backend, every call): each row's M pages are gathered into a dense
  [B, M*Z, K, H] view (an XLA gather), so the mask and position biases are exactly those
  of the dense `KVCache`: key slot s holds position s, and slots past a row's length are
  in its future and therefore invisible. The layers only read the pools; the cache
  scatters every layer's new keys and values into them once, after the last layer.
- **pallas** (`PagedKVCache(..., kernel="pallas")`, one token per row, unrolled layers):
  JAX's Pallas paged-attention kernel for GPUs
  (`jax.experimental.pallas.ops.gpu.paged_attention`) reads the pages where they lie, with
  no gathered copy. The kernel attends to the first `length` slots of a row and returns
  only the attention output, so each layer first writes its step's key and value into
  the pools and then reads them: the pools pass from layer to layer. On a CPU the same
  kernel runs in Pallas' interpret mode (slow; it is how the tests check this path). It
  has no position bias and no sliding window, so ALiBi, relative-bucket and
  sliding-window models decode through the gather path. Calls with several tokens per
  row (prefill chunks) use the gather path on the same pools. In bfloat16 the kernel
  also combines its partial sums in bfloat16: against an f32 reference its error measured
  ~1.5x the gather path's (1.1-1.5e-2 against 0.75-1.05e-2 on random inputs).

Unused table entries point at the null page (of each layer), which absorbs writes that
belong nowhere (padding tokens, idle batch rows) and is only ever read at masked slots.
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
    k_pool: jax.Array  # [K, L, P, Z, H]
    v_pool: jax.Array


@flax.struct.dataclass
class PagedKernelStep:
    """The `write_at` of a paged AttentionContext whose one-token step runs the Pallas kernel.

    Each layer writes before it reads (`paged_kernel_attention`), so the pools pass from
    layer to layer as the layer's cache entry `(layer, k_pool, v_pool)`; the transformer
    takes them from here for the first layer and clears them from the plan the layers see.
    """

    slot_B: jax.Array  # [B] flat pool slot (page * Z + offset, within a layer) of each row's new token
    pages_BM: jax.Array  # [B, M] the page table
    length_B: jax.Array  # [B] slots each row attends to: its cached tokens and the new one
    k_pool: jax.Array | None  # [K, L, P, Z, H]
    v_pool: jax.Array | None
    interpret: bool = flax.struct.field(pytree_node=False, default=False)


@flax.struct.dataclass
class WrittenPools:
    """What the layers of a kernel step hand back: the pools with every layer's new entries in."""

    k: jax.Array
    v: jax.Array


KERNELS = ("gather", "pallas")


@flax.struct.dataclass
class PagedKVCache:
    """The pool of every layer plus this batch's page tables; see the module docstring.

    kernel: how one-token steps read the pages, "gather" or "pallas" (see the module
    docstring); calls with several tokens per row always gather.
    """

    k: jax.Array
    v: jax.Array
    page_table: jax.Array
    end: jax.Array
    kernel: str = flax.struct.field(pytree_node=False, default="gather")

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"PagedKVCache kernel must be one of {KERNELS}, got {self.kernel!r}")

    @staticmethod
    def init_pool(cfg: ModelConfig, num_pages: int, page_size: int, dtype=None) -> tuple[jax.Array, jax.Array]:
        """Zeroed (k, v) pools [K, L, num_pages, page_size, H]; page 0 is the null page."""
        if cfg.mask != "causal":
            raise ValueError(f"the paged cache serves causal decoders; model.mask={cfg.mask!r} is not supported")
        if num_pages < 2 or page_size < 1:
            raise ValueError(f"a page pool needs num_pages >= 2 (one is the null page) and page_size >= 1, "
                             f"got num_pages={num_pages}, page_size={page_size}")
        shape = (cfg.kv_heads, cfg.n_layers, num_pages, page_size, cfg.head_dim)
        dtype = compute_dtype(cfg) if dtype is None else dtype
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    @property
    def page_size(self) -> int:
        return self.k.shape[3]

    @property
    def max_len(self) -> int:
        return self.page_table.shape[1] * self.page_size

    @property
    def prefix(self) -> jax.Array:
        # Causal models only: no slot is ever a prefix-LM prefix token.
        return jnp.zeros((self.end.shape[0], self.max_len), bool)

    def layer_entries(self) -> tuple:
        """Each layer's entry is just its index into the pools (see PagedWrite)."""
        return (jnp.arange(self.k.shape[1]),)

    def with_layer_entries(self, entries, end: jax.Array, prefix: jax.Array) -> "PagedKVCache":
        """Scatter every layer's new keys/values [L, B, T, K, H] into the pools (or take the
        pools a kernel step's layers wrote themselves)."""
        del prefix
        if isinstance(entries, WrittenPools):
            return self.replace(k=entries.k, v=entries.v, end=end)
        k_new, v_new = entries
        T = k_new.shape[2]
        slots_BT = self._slots(self.end[:, None] + jnp.arange(T)[None, :])
        return self.replace(k=_scatter(self.k, k_new, slots_BT), v=_scatter(self.v, v_new, slots_BT), end=end)

    def write_plan(self, q_pos_BT: jax.Array) -> PagedWrite | PagedKernelStep:
        if self.kernel == "pallas" and q_pos_BT.shape[1] == 1:
            backend = jax.default_backend()
            if backend not in ("gpu", "cpu"):
                raise ValueError(f"the Pallas paged-attention kernel here is JAX's GPU kernel; on {backend!r} "
                                 f"use kernel='gather'")
            return PagedKernelStep(slot_B=self._slots(q_pos_BT)[:, 0], pages_BM=self.page_table,
                                   length_B=q_pos_BT[:, 0] + 1, k_pool=self.k, v_pool=self.v,
                                   interpret=backend == "cpu")
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


def paged_kernel_attention(q_B1NH, k_B1KH, v_B1KH, kv, plan: PagedKernelStep):
    """One-token attention through the Pallas kernel: this layer's new key and value are
    written into the pools first, then the kernel reads the row's pages in place.

    kv is (layer, k_pool, v_pool); returns the output [B, 1, N, H] and the written pools.
    """
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    layer, k_pool, v_pool = kv
    K, L, P, Z, H = k_pool.shape
    k_pool = _write_step(k_pool, layer, plan.slot_B, k_B1KH[:, 0])
    v_pool = _write_step(v_pool, layer, plan.slot_B, v_B1KH[:, 0])
    M = plan.pages_BM.shape[1]
    # The kernel splits each row's M pages into k_splits parallel parts and walks each in
    # blocks of pages; Triton needs both powers of two, and a block of at most ~128 keys
    # keeps its key and value tiles within a GPU's shared memory.
    k_splits = _power_of_two_divisor(M, 16)
    per_block = _power_of_two_divisor(M // k_splits, max(1, min(8, 128 // Z)))
    # The layer's pages sit at [layer * P, (layer + 1) * P) of the [K, L*P, Z, H] view.
    out_BNH = paged_attention(
        (q_B1NH[:, 0] * H**-0.5).astype(k_pool.dtype), k_pool.reshape(K, L * P, Z, H),
        v_pool.reshape(K, L * P, Z, H), plan.pages_BM + layer * P, plan.length_B.astype(jnp.int32),
        k_splits=k_splits, pages_per_compute_block=per_block, interpret=plan.interpret)
    return out_BNH[:, None].astype(q_B1NH.dtype), (k_pool, v_pool)


def _power_of_two_divisor(n: int, at_most: int) -> int:
    """The largest power of two that divides n and is at most `at_most`."""
    d = 1
    while n % (2 * d) == 0 and 2 * d <= at_most:
        d *= 2
    return d


def _write_step(pool_KLPZH, layer, slot_B, new_BKH):
    """Write each row's key (or value) [B, K, H] at its slot of this layer, in place."""
    K, L, P, Z, H = pool_KLPZH.shape
    flat = pool_KLPZH.reshape(K, L, P * Z, H)
    flat = flat.at[:, layer, slot_B].set(new_BKH.transpose(1, 0, 2).astype(flat.dtype))
    return flat.reshape(K, L, P, Z, H)


def _read(pool_KLPZH, layer, pages_BM, q_pos_BT, new_BTKH):
    K, _, _, Z, H = pool_KLPZH.shape
    B, M = pages_BM.shape
    view_KBMZH = pool_KLPZH[:, layer, pages_BM]  # one gather, no copy of the pool
    view_BSKH = view_KBMZH.transpose(1, 2, 3, 0, 4).reshape(B, M * Z, K, H)
    rows = jnp.arange(B)[:, None]
    # Positions past the table (padding of a row near the end of the context) are dropped.
    return view_BSKH.at[rows, q_pos_BT].set(new_BTKH.astype(view_BSKH.dtype), mode="drop")


def _scatter(pool_KLPZH, new_LBTKH, slots_BT):
    K, L, P, Z, H = pool_KLPZH.shape
    flat = pool_KLPZH.reshape(K, L, P * Z, H)
    new_KLNH = new_LBTKH.reshape(L, -1, K, H).transpose(2, 0, 1, 3)
    flat = flat.at[:, :, slots_BT.reshape(-1)].set(new_KLNH.astype(flat.dtype))
    return flat.reshape(K, L, P, Z, H)
