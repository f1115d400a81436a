"""Continuous batching: requests join and leave the running batch between decoding steps.

One `Engine.step()`:

    admit      waiting requests take free batch slots (oldest first), reusing cached prefix pages
    plan       rows with one token to feed decode; rows with more (a new or resumed prompt)
               get a chunk of at most `prefill_chunk` tokens, so a long prompt is spread over
               several steps instead of stalling every other request
    pages      each row gets the pages its new tokens need, oldest request first; when the pool
               is empty the youngest running request is preempted: its pages go back and it
               waits to be recomputed (its prompt plus what it had generated) when room returns
    run        one jitted prefill call [prefill_rows, prefill_chunk] and one jitted decode call
               [max_batch, 1]; both write through page tables into the same pool (the decode
               call reads it through JAX's Pallas paged-attention kernel on a GPU, see
               `EngineConfig.paged_attention`)
    finish     new tokens are checked against stop sequences and max_tokens; finished rows
               free their slot and pages at once

Reproducibility: each request has its own random key, `jax.random.key(seed)`, split once
per generated token exactly as `generate` splits its key, and samples from its own
[1, V] logits. So a request gets the same tokens as `generate([prompt], seed=seed)` (one
prompt per call), whatever else runs in the batch, up to float rounding in the logits
(different batch shapes may round differently in the last bit).
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import itertools
import math
import threading
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.inference.generate import prepare_decoding_weights
from llm_jax.inference.paged_cache import PagePool, chain_key
from llm_jax.inference.quantize import dequantize_params
from llm_jax.inference.sampling import SamplingParams, sample
from llm_jax.models import Transformer
from llm_jax.models.layers import compute_dtype
from llm_jax.models.paged import NULL_PAGE, PagedKVCache

# What an idle row samples with (any valid settings do; its token is thrown away).
_SAMPLING_DEFAULTS = {name: np.asarray(value)[0] for name, value in vars(SamplingParams.make(1)).items()}


def _buckets(smallest: int, largest: int) -> list[int]:
    """Compiled sizes: powers of two from `smallest` below `largest`, then `largest` itself."""
    sizes, size = [largest], smallest
    while size < largest:
        sizes.append(size)
        size *= 2
    return sorted(sizes)


class RequestError(ValueError):
    """A request the engine refuses (bad input, or it can never fit); the message says why."""


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Sizes of the running batch, the page pool and the prefill chunks."""

    max_batch: int = 8  # requests decoding at once: the rows of the decode step
    page_size: int = 16  # tokens per page
    num_pages: int = 256  # pages in the pool, including the null page
    prefill_chunk: int = 64  # prompt tokens one row feeds per step
    prefill_rows: int = 2  # prompts advanced per step
    prefix_caching: bool = True  # share the pages of a common prompt prefix
    static_batching: bool = False  # benchmark reference: admit only into an empty batch
    # How decode steps read the pages (models/paged.py): "gather" (XLA, every backend),
    # "pallas" (JAX's Pallas GPU kernel; on a CPU in interpret mode, for tests) or "auto"
    # (the kernel on a CUDA GPU when the model allows it and head_dim and page_size are
    # powers of two >= 16, else the gather). Prefill chunks always gather.
    paged_attention: str = "auto"

    def __post_init__(self):
        for name in ("max_batch", "page_size", "prefill_chunk", "prefill_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_pages < 2:
            raise ValueError(f"engine.num_pages must be >= 2 (page 0 is the null page), got {self.num_pages}")
        if self.paged_attention not in ("auto", "gather", "pallas"):
            raise ValueError(f"engine.paged_attention must be 'auto', 'gather' or 'pallas', "
                             f"got {self.paged_attention!r}")
        if self.prefill_rows > self.max_batch:
            raise ValueError(f"engine.prefill_rows={self.prefill_rows} exceeds engine.max_batch={self.max_batch}")


@dataclasses.dataclass(eq=False)
class Request:
    """One completion request and its progress. Fields after `on_update` belong to the engine."""

    prompt: list[int]
    max_tokens: int
    sampling: dict  # SamplingParams settings for this request (validated at submit)
    stop_sequences: list[list[int]]
    seed: int
    # Called on the engine's thread as on_update(request, new_tokens, finished); new tokens
    # never include any part of a stop sequence.
    on_update: Callable[["Request", list[int], bool], None] | None = None
    id: int = 0
    output: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    preemptions: int = 0
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    # Scheduling state.
    key_data: np.ndarray | None = None  # this request's random key (raw uint32 data)
    slot: int | None = None
    pages: list[int] = dataclasses.field(default_factory=list)
    page_keys: list[bytes] = dataclasses.field(default_factory=list)  # keys of its full pages
    n_cached: int = 0  # tokens of prompt + output whose keys/values are in its pages
    emitted: int = 0

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.output

    @property
    def to_feed(self) -> int:
        return len(self.prompt) + len(self.output) - self.n_cached


def _decode_kernel(cfg: ModelConfig, config: "EngineConfig") -> str:
    """EngineConfig.paged_attention resolved for this model and backend: "gather" or "pallas"."""
    choice = config.paged_attention
    if choice == "gather":
        return choice
    backend = jax.default_backend()
    unsupported = [why for bad, why in ((cfg.position in ("alibi", "relative"), f"model.position={cfg.position!r}"),
                                        (cfg.sliding_window is not None, "model.sliding_window"))
                   if bad]
    # The kernel's Triton blocks need power-of-two sizes of at least 16: its query block is
    # [16, head_dim] and each key/value block [pages, page_size, head_dim].
    tiles = all(n >= 16 and n & (n - 1) == 0 for n in (cfg.head_dim, config.page_size))
    if choice == "auto":
        cuda = backend == "gpu" and "rocm" not in jax.devices()[0].client.platform_version.lower()
        return "pallas" if cuda and tiles and not unsupported else "gather"
    if unsupported:
        raise ValueError(f"engine.paged_attention='pallas': the Pallas kernel has no position bias or sliding "
                         f"window, and this model has {' and '.join(unsupported)}; use 'gather' or 'auto'")
    if backend not in ("gpu", "cpu"):
        raise ValueError(f"engine.paged_attention='pallas' runs JAX's GPU kernel (interpreted on a CPU); "
                         f"on {backend!r} use 'gather' or 'auto'")
    if backend == "gpu" and not tiles:
        raise ValueError(f"engine.paged_attention='pallas' on a GPU needs model.head_dim and engine.page_size to be "
                         f"powers of two >= 16 (the kernel's Triton blocks); got head_dim={cfg.head_dim}, "
                         f"page_size={config.page_size}")
    return choice


@functools.partial(jax.jit, static_argnames=("cfg", "kernel"), donate_argnames=("k_pool", "v_pool", "counts_SV"))
def _forward(params, cfg: ModelConfig, kernel: str, k_pool, v_pool, counts_SV, tokens_RT, n_valid_R, start_R,
             table_RM, slot_R, keys_R, sp: SamplingParams):
    """Feed each row's tokens through the paged cache and sample the token after its last one.

    Rows are requests (slot_R indexes the per-slot penalty counts; an out-of-range slot
    marks an idle row, whose writes go to the null page and whose results are ignored).
    Returns the pools, counts, the sampled tokens [R] and each row's advanced key.
    """
    R, T = tokens_RT.shape
    cache = PagedKVCache(k=k_pool, v=v_pool, page_table=table_RM, end=start_R, kernel=kernel)
    weights = dequantize_params(params, compute_dtype(cfg))
    logits_R1V, cache = Transformer(cfg).apply({"params": weights}, tokens_RT, cache=cache,
                                               logits_at_B=jnp.maximum(n_valid_R - 1, 0))
    valid_RT = jnp.arange(T)[None, :] < n_valid_R[:, None]
    # Penalty counts cover every token fed so far (prompt and output), as in `generate`.
    counts_SV = counts_SV.at[slot_R[:, None], tokens_RT].add(valid_RT.astype(jnp.int32), mode="drop")
    last_RV = logits_R1V[:, 0]

    # Each row's key is split as `generate` splits its key for a batch of one.
    keys_R, draws_R = jax.vmap(jax.random.split, out_axes=1)(jax.random.wrap_key_data(keys_R))
    counts_RV = counts_SV[jnp.minimum(slot_R, counts_SV.shape[0] - 1)]
    tokens_R = sample(last_RV, draws_R, sp, counts_RV)
    keys_R = jax.random.key_data(keys_R)
    return cache.k, cache.v, counts_SV, tokens_R, keys_R


class CallInputs(NamedTuple):
    """One engine call's rows on the host: tokens [R, T], the number of them that are real,
    the cache position of the first, the page table [R, M], the batch slot (out of range for an
    idle row), the random key data [R, 2] and each sampling setting [R]."""

    tokens: np.ndarray
    n_valid: np.ndarray
    start: np.ndarray
    table: np.ndarray
    slot: np.ndarray
    keys: np.ndarray
    sampling: dict


@functools.partial(jax.jit, donate_argnums=0)
def _set_counts_row(counts_SV, slot, row_V):
    return counts_SV.at[slot].set(row_V)


class Engine:
    """Runs requests on one model with continuous batching over a paged KV cache.

    `submit` and `abort` may be called from any thread; `step` from one thread at a time
    (the server's engine thread, or `run_until_idle`).
    """

    def __init__(self, params, cfg: ModelConfig, config: EngineConfig = EngineConfig()):
        self.config = config
        self.kernel = _decode_kernel(cfg, config)
        # Unrolled layers and joined projections, as the decoding loop reads them: a scanned
        # stack copies each layer's weights out of the stacked arrays in every call (10 of
        # 50 ms of a batch-8 decode call of a 30M model on two CPU cores).
        self.params, self.cfg = prepare_decoding_weights(params, cfg)
        if self.kernel == "pallas" and self.cfg.scan_layers:  # the kernel step passes the pools from layer to layer
            raise ValueError("engine.paged_attention='pallas' needs the layers unrolled, and these weights have leaves "
                             "that cannot be sliced by layer; use 'gather'")
        self.pool = PagePool(config.num_pages, config.page_size, prefix_caching=config.prefix_caching)
        self.k_pool, self.v_pool = PagedKVCache.init_pool(cfg, config.num_pages, config.page_size)
        self.max_pages = math.ceil(cfg.max_seq_len / config.page_size)
        self.counts = jnp.zeros((config.max_batch, cfg.vocab_size), jnp.int32)
        self.slots: list[Request | None] = [None] * config.max_batch
        self.waiting: list[Request] = []  # sorted by id (arrival order)
        self._inbox: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.wakeup = threading.Event()  # set when work arrives, for a waiting engine thread
        self.stats = collections.Counter(
            dict.fromkeys(("generated_tokens", "prefill_tokens", "decode_tokens", "steps", "preemptions", "finished",
                           "aborted"), 0))

    # ------------------------------------------------------------------ the public interface

    def submit(self, prompt: Sequence[int], *, max_tokens: int = 16, sampling: dict | None = None,
               stop_sequences: Sequence[Sequence[int]] = (), seed: int = 0,
               on_update: Callable | None = None) -> Request:
        """Queue a request; raises RequestError (with the reason) if it is invalid or can never fit."""
        request = Request(prompt=[int(t) for t in prompt], max_tokens=max_tokens, sampling=dict(sampling or {}),
                          stop_sequences=[[int(t) for t in s] for s in stop_sequences], seed=seed,
                          on_update=on_update)
        self._validate(request)
        request.id = next(self._ids)
        request.submitted_at = time.perf_counter()
        with self._lock:
            self._inbox.append(("submit", request))
        self.wakeup.set()
        return request

    def abort(self, request: Request) -> None:
        """Stop a request (a client went away); its pages are freed at the next step."""
        with self._lock:
            self._inbox.append(("abort", request))
        self.wakeup.set()

    def fail_all(self) -> None:
        """Finish every queued and running request with finish_reason "error" (after a failed step)."""
        self._drain_inbox()
        for r in [*self.waiting, *(q for q in self.slots if q is not None)]:
            self._finish(r, "error")
        self.waiting.clear()

    def has_work(self) -> bool:
        return bool(self._inbox or self.waiting or any(self.slots))

    def run_until_idle(self) -> None:
        while self.has_work():
            self.step()

    def warmup(self) -> None:
        """Compile every prefill and decode shape (idle rows only) so that no request waits for XLA."""
        rows = sorted({1, self.config.prefill_rows})
        shapes = [(r, w) for r in rows for w in self._prefill_widths()] + [(self.config.max_batch, 1)]
        for n_rows, width in shapes:
            for n_pages in self._page_buckets(width):
                self._run([], n_rows, width, n_pages)
        self.counts = _set_counts_row(self.counts, 0, jnp.zeros(self.cfg.vocab_size, jnp.int32))

    def _page_buckets(self, width: int) -> list[int]:
        """Compiled page-table widths. The Pallas kernel splits a row's pages into power-of-two
        blocks, so its decode calls get power-of-two widths (the padding is null pages,
        which the kernel never reads: it stops at each row's length)."""
        if width == 1 and self.kernel == "pallas":
            return _buckets(4, max(4, 1 << (self.max_pages - 1).bit_length()))
        # A table holds at least the call's width of tokens (the model reads the chunk's
        # positions against the table's slots).
        return [b for b in _buckets(4, self.max_pages) if b * self.config.page_size >= width]

    def _prefill_widths(self) -> list[int]:
        """Compiled prefill widths: up to prefill_chunk, and never past the model's context."""
        return _buckets(16, min(self.config.prefill_chunk, self.cfg.max_seq_len))

    def _prefill_shape(self, rows: list[Request], feeds: dict) -> tuple[int, int]:
        """[rows, width] of the prefill call: one row or prefill_rows, and the narrowest compiled
        width that holds every chunk (with continuous batching prompts mostly arrive one by one)."""
        longest = max(feeds[r.id] for r in rows)
        n_rows = 1 if len(rows) == 1 else self.config.prefill_rows
        return n_rows, next(w for w in self._prefill_widths() if w >= longest)

    def snapshot(self) -> dict:
        """Queue and pool gauges (for /metrics and tests)."""
        with self._lock:
            inbox = collections.Counter(kind for kind, _ in self._inbox)
        return dict(waiting=len(self.waiting) + inbox["submit"], aborting=inbox["abort"],
                    running=sum(r is not None for r in self.slots),
                    pages_in_use=self.pool.in_use(), pages_available=self.pool.available(),
                    prefix_hit_pages=self.pool.prefix_hits, **self.stats)

    # ------------------------------------------------------------------ validation

    def _validate(self, r: Request) -> None:
        cfg, config = self.cfg, self.config
        if not r.prompt:
            raise RequestError("prompt is empty; it needs at least one token")
        bad = [t for t in r.prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise RequestError(f"prompt has token ids outside [0, {cfg.vocab_size}): {bad[:5]}")
        if not isinstance(r.max_tokens, int) or r.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {r.max_tokens!r}")
        total = len(r.prompt) + r.max_tokens
        if total > cfg.max_seq_len:
            raise RequestError(f"the prompt ({len(r.prompt)} tokens) plus max_tokens ({r.max_tokens}) is {total} "
                               f"tokens, more than the model's context of {cfg.max_seq_len}")
        if math.ceil(total / config.page_size) > self.pool.capacity:
            raise RequestError(f"the prompt plus max_tokens ({total} tokens) can never fit the KV-cache pool of "
                               f"{self.pool.capacity} pages x {config.page_size} tokens")
        if not isinstance(r.seed, int) or not -(2**63) <= r.seed < 2**63:
            raise RequestError(f"seed must be an integer that fits in 64 signed bits, got {r.seed!r}")
        if any(not s for s in r.stop_sequences):
            raise RequestError("stop sequences must not be empty")
        try:  # on the host: this runs on the server's event loop, which must not dispatch to the device
            SamplingParams.checked(1, **r.sampling)
        except ValueError as e:
            # DecodeConfig names the field decode.<name>; a request calls it <name>.
            raise RequestError(f"invalid sampling parameters: {str(e).replace('decode.', '')}") from None

    # ------------------------------------------------------------------ one step

    def step(self) -> None:
        """Admit, plan, allocate, run one prefill and one decode call, finish requests."""
        self._drain_inbox()
        self._admit()
        running = sorted((r for r in self.slots if r is not None), key=lambda r: r.id)
        prefill = [r for r in running if r.to_feed > 1][: self.config.prefill_rows]
        decode = [r for r in running if r.to_feed == 1]
        feeds = {r.id: min(r.to_feed, self.config.prefill_chunk) for r in prefill + decode}
        for r in sorted(prefill + decode, key=lambda r: r.id):
            if r.slot is not None:
                self._reserve_pages(r, r.n_cached + feeds[r.id])
        prefill = [r for r in prefill if r.slot is not None]
        decode = [r for r in decode if r.slot is not None]
        # Both calls are dispatched before either result is fetched, so that preparing the
        # decode call overlaps the prefill computation (the two touch disjoint requests).
        calls = []
        if prefill:
            shape = self._prefill_shape(prefill, feeds)
            calls.append((prefill, self._run([(r, feeds[r.id]) for r in prefill], *shape)))
        if decode:
            calls.append((decode, self._run([(r, feeds[r.id]) for r in decode], self.config.max_batch, 1)))
        for rows, results in calls:
            self._advance(rows, feeds, rows is prefill, *jax.device_get(results))
        self.stats["steps"] += 1

    def _drain_inbox(self) -> None:
        with self._lock:
            items, self._inbox = list(self._inbox), collections.deque()
        for kind, r in items:
            if kind == "submit":
                # The key is made here, on the engine's thread: `submit` runs on the server's
                # event loop, which must not dispatch to the device.
                try:
                    r.key_data = np.asarray(jax.random.key_data(jax.random.key(r.seed)))
                except (OverflowError, TypeError, ValueError):  # `submit` validates seeds; this is a last guard
                    self._finish(r, "error")
                    continue
                bisect.insort(self.waiting, r, key=lambda q: q.id)
            elif r.finish_reason is None:
                if r in self.waiting:
                    self.waiting.remove(r)
                self._finish(r, "abort")
                self.stats["aborted"] += 1

    def _admit(self) -> None:
        if self.config.static_batching and any(self.slots):
            return  # static batching: the whole batch finishes before the next one starts
        while self.waiting and None in self.slots:
            r = self.waiting[0]
            busy = any(self.slots)
            # Admit only what the pool can hold now, unless the batch is empty (then the
            # request runs alone, and submit-time validation guarantees that it fits).
            if busy and self.pool.available() < math.ceil((len(r.sequence) + 1) / self.config.page_size):
                return
            self.waiting.pop(0)
            self._place(r, self.slots.index(None))

    def _place(self, r: Request, slot: int) -> None:
        """Give a request a batch slot and the cached pages of its longest known prefix."""
        Z = self.config.page_size
        seq = r.sequence
        key, keys = b"", []
        for j in range((len(seq) - 1) // Z):  # leave at least one token to feed
            key = chain_key(key, seq[j * Z : (j + 1) * Z])
            keys.append(key)
        r.pages = self.pool.lookup(keys)
        r.page_keys = keys[: len(r.pages)]
        r.n_cached = len(r.pages) * Z
        r.slot = slot
        self.slots[slot] = r
        cached_counts = np.bincount(np.asarray(seq[: r.n_cached], np.int64), minlength=self.cfg.vocab_size)
        self.counts = _set_counts_row(self.counts, slot, jnp.asarray(cached_counts, jnp.int32))

    def _reserve_pages(self, r: Request, n_tokens: int) -> None:
        """Pages for the first n_tokens of r, preempting younger requests (or r) when the pool is empty."""
        while len(r.pages) < math.ceil(n_tokens / self.config.page_size):
            page = self.pool.allocate()
            if page is None:
                victim = max((q for q in self.slots if q is not None), key=lambda q: q.id)
                self._preempt(victim)
                if victim is r:
                    return
                continue
            r.pages.append(page)

    def _preempt(self, r: Request) -> None:
        """Return a running request's pages and put it back in the queue, to be recomputed later."""
        self._release(r)
        r.n_cached, r.preemptions = 0, r.preemptions + 1
        self.stats["preemptions"] += 1
        bisect.insort(self.waiting, r, key=lambda q: q.id)

    def _release(self, r: Request) -> None:
        self.pool.release(r.pages)
        r.pages, r.page_keys = [], []
        if r.slot is not None:
            self.slots[r.slot] = None
            r.slot = None

    # ------------------------------------------------------------------ running and finishing

    def _advance(self, rows: list[Request], feeds: dict, is_prefill: bool, tokens, keys) -> None:
        """Take in one call's results: advance each row, sample where its input ended."""
        now = time.perf_counter()
        for i, r in enumerate(rows):
            r.n_cached += feeds[r.id]
            self.stats["prefill_tokens" if is_prefill else "decode_tokens"] += feeds[r.id]
            self._register_full_pages(r)
            if r.to_feed > 0:
                continue  # a prompt chunk that does not reach the end samples nothing
            r.key_data = keys[i]
            r.output.append(int(tokens[i]))
            r.first_token_at = r.first_token_at or now
            self.stats["generated_tokens"] += 1
            self._after_token(r)

    def _run(self, rows: list[tuple[Request, int]], n_rows: int, width: int, n_pages: int | None = None):
        """Dispatch one jitted call over n_rows x width tokens (rows past len(rows) are idle);
        returns the sampled tokens and advanced keys, still on the device."""
        return self._dispatch(self._call_inputs(rows, n_rows, width, n_pages))

    def _call_inputs(self, rows: list[tuple[Request, int]], n_rows: int, width: int,
                     n_pages: int | None = None) -> CallInputs:
        """The host arrays of one call: each (request, n) row feeds the request's next n tokens.

        The page tables are cut to the fewest (bucketed) pages any row needs: attention then
        gathers and scores only those, not the whole context, for every row.
        """
        if n_pages is None:
            needed = max([math.ceil((r.n_cached + n) / self.config.page_size) for r, n in rows], default=1)
            n_pages = next(b for b in self._page_buckets(width) if b >= needed)
        x = CallInputs(tokens=np.zeros((n_rows, width), np.int32), n_valid=np.zeros(n_rows, np.int32),
                       start=np.zeros(n_rows, np.int32), table=np.full((n_rows, n_pages), NULL_PAGE, np.int32),
                       slot=np.full(n_rows, self.config.max_batch, np.int32),  # out of range: idle
                       keys=np.zeros((n_rows, 2), np.uint32),
                       sampling={name: np.full(n_rows, value) for name, value in _SAMPLING_DEFAULTS.items()})
        for i, (r, n) in enumerate(rows):
            x.tokens[i, :n] = r.sequence[r.n_cached : r.n_cached + n]
            x.n_valid[i], x.start[i], x.slot[i], x.keys[i] = n, r.n_cached, r.slot, r.key_data
            x.table[i, : len(r.pages)] = r.pages
            for name, value in r.sampling.items():
                x.sampling[name][i] = value
        return x

    def _forward_args(self, x: CallInputs) -> tuple:
        """`_forward`'s arguments for one call: the engine's weights and state, then x."""
        return (self.params, self.cfg, self.kernel, self.k_pool, self.v_pool, self.counts, x.tokens, x.n_valid,
                x.start, x.table, x.slot, x.keys, SamplingParams(**x.sampling))

    def _dispatch(self, x: CallInputs):
        """Launch `_forward` on x; the pools and counts it returns replace the donated ones."""
        self.k_pool, self.v_pool, self.counts, out_tokens, out_keys = _forward(*self._forward_args(x))
        return out_tokens, out_keys

    def _register_full_pages(self, r: Request) -> None:
        """Offer r's newly filled pages to the prefix cache (prompt and generated tokens alike)."""
        Z = self.config.page_size
        seq = r.sequence
        while len(r.page_keys) < r.n_cached // Z:
            j = len(r.page_keys)
            key = chain_key(r.page_keys[-1] if r.page_keys else b"", seq[j * Z : (j + 1) * Z])
            r.page_keys.append(key)
            self.pool.register(r.pages[j], key)

    def _after_token(self, r: Request) -> None:
        """Stop sequences (longest match, removed), max_tokens, and streaming what is final."""
        stop = max((len(s) for s in r.stop_sequences if r.output[-len(s):] == s), default=0)
        if stop:
            del r.output[len(r.output) - stop :]
            self._finish(r, "stop")
        elif len(r.output) >= r.max_tokens:
            self._finish(r, "length")
        else:
            # Hold back what might still become the start of a stop sequence.
            hold = max((len(s) for s in r.stop_sequences), default=1) - 1
            safe = len(r.output) - hold
            if safe > r.emitted:
                self._emit(r, r.output[r.emitted : safe], False)

    def _finish(self, r: Request, reason: str) -> None:
        self._release(r)
        r.finish_reason, r.finished_at = reason, time.perf_counter()
        self.stats["finished"] += 1
        self._emit(r, r.output[r.emitted :] if reason != "abort" else [], True)
        r.done.set()

    def _emit(self, r: Request, tokens: list[int], finished: bool) -> None:
        r.emitted += len(tokens)
        if r.on_update is not None:
            r.on_update(r, tokens, finished)
