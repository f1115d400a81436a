"""Host-side bookkeeping of the page pool: free pages, reference counts and the prefix cache.

The device arrays (`llm_jax.models.paged.PagedKVCache`) never move; this class decides
which pool page each sequence's tokens go to. A page is in exactly one of three states:

    free        on the free list, holding nothing anyone wants
    in use      referenced by >= 1 running sequences (ref count > 0)
    cached      ref count 0, but its tokens are registered in the prefix cache: a later
                request with the same prefix takes it back instead of recomputing it;
                the least recently used cached page is evicted when the free list is empty

Prefix-cache keys are chained digests: the key of page j covers every token of pages
0..j, so two sequences share page j only if their whole prefixes up to it are equal.
Only full pages are registered, and a sequence only ever writes past its cached pages,
so a shared page is never written again (no copy-on-write needed).
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np

from llm_jax.models.paged import NULL_PAGE


def chain_key(previous: bytes, page_tokens: Sequence[int]) -> bytes:
    """The prefix-cache key of a page: a digest of the previous page's key and its tokens."""
    return hashlib.blake2b(previous + np.asarray(page_tokens, np.int64).tobytes(), digest_size=16).digest()


def page_keys(tokens: Sequence[int], page_size: int) -> list[bytes]:
    """The chained prefix-cache key of every full page of `tokens`."""
    keys, key = [], b""
    for start in range(0, len(tokens) - page_size + 1, page_size):
        key = chain_key(key, tokens[start : start + page_size])
        keys.append(key)
    return keys


class PagePool:
    """Allocates pages 1..num_pages-1 (page 0 is the null page) and caches shared prefixes."""

    def __init__(self, num_pages: int, page_size: int, *, prefix_caching: bool = True):
        if num_pages < 2 or page_size < 1:
            raise ValueError(f"a page pool needs num_pages >= 2 and page_size >= 1, "
                             f"got num_pages={num_pages}, page_size={page_size}")
        self.num_pages, self.page_size, self.prefix_caching = num_pages, page_size, prefix_caching
        self._free = collections.deque(p for p in range(num_pages) if p != NULL_PAGE)
        self._refs = np.zeros(num_pages, np.int64)
        self._page_of_key: dict[bytes, int] = {}
        self._key_of_page: dict[int, bytes] = {}
        self._cached = collections.OrderedDict()  # ref-count-0 registered pages, oldest use first
        self.prefix_hits = 0  # pages taken from the prefix cache instead of being computed

    @property
    def capacity(self) -> int:
        """Pages a single sequence could ever hold (all but the null page)."""
        return self.num_pages - 1

    def available(self) -> int:
        """Pages an allocation can get now: free plus evictable cached ones."""
        return len(self._free) + len(self._cached)

    def in_use(self) -> int:
        return int(np.count_nonzero(self._refs))

    def allocate(self) -> int | None:
        """A fresh page with ref count 1, evicting the least recently used cached page if needed."""
        if self._free:
            page = self._free.popleft()
        elif self._cached:
            page, _ = self._cached.popitem(last=False)
            del self._page_of_key[self._key_of_page.pop(page)]
        else:
            return None
        self._refs[page] = 1
        return page

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; unreferenced pages become cached or free."""
        for page in pages:
            if self._refs[page] <= 0:
                raise RuntimeError(f"page {page} released more often than it was taken")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of_page:
                    self._cached[page] = None
                else:
                    self._free.append(page)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """Take a reference to the cached pages of the longest matching prefix of `keys`."""
        pages = []
        for key in keys if self.prefix_caching else ():
            page = self._page_of_key.get(key)
            if page is None:
                break
            if self._refs[page] == 0:
                del self._cached[page]
            self._refs[page] += 1
            pages.append(page)
        self.prefix_hits += len(pages)
        return pages

    def register(self, page: int, key: bytes) -> None:
        """Offer a full, in-use page to the prefix cache (kept only if the key is new)."""
        if not self.prefix_caching or key in self._page_of_key or page in self._key_of_page:
            return
        self._page_of_key[key] = page
        self._key_of_page[page] = key
