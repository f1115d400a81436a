"""Deduplication: exact (a hash of normalised text) and near (MinHash + LSH, datasketch).

Both are split into a pure part and a stateful part, so the pure part runs in worker
processes (or Beam workers) and only a small index lives in one place:

    signature(text) -> hashable / MinHash values       pure, parallel
    index.add(ordinal, doc_id, signature) -> dup of?   sequential, in input order

The first document of a group of duplicates is kept; the others are removed with the
id of the document they duplicate. Near duplicates are found by MinHash over word
n-gram shingles (Broder 1997): the fraction of equal MinHash values estimates the
Jaccard similarity of two documents' shingle sets, and locality-sensitive hashing
(bands of values) proposes candidates without comparing every pair. A candidate counts
only if its estimated Jaccard similarity reaches the threshold, which keeps precision
high; the LSH bands are tuned to favour recall.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import unicodedata

import numpy as np

_NON_WORD = re.compile(r"[^\w\s]")
# datasketch's 32-bit permutation scheme (its default since 2.0), named so that stored
# signatures and the index always agree.
_SCHEME = "affine32"


@dataclasses.dataclass(frozen=True)
class ExactDedupConfig:
    # Compare normalised text (NFKC, case-folded, punctuation and whitespace runs
    # removed) rather than the raw bytes.
    normalize: bool = True

    def __post_init__(self):
        if not isinstance(self.normalize, bool):
            raise ValueError(f"exact_dedup.normalize must be true or false, got {self.normalize!r}")


@dataclasses.dataclass(frozen=True)
class NearDedupConfig:
    threshold: float = 0.8  # Jaccard similarity of shingle sets at which two documents are duplicates
    num_perm: int = 128  # MinHash values per document; the estimate's standard error is ~sqrt(J(1-J)/num_perm)
    shingle_words: int = 5  # words per shingle
    seed: int = 1
    # LSH band tuning: weight of false positives vs false negatives (datasketch's weights).
    false_negative_weight: float = 0.9

    def __post_init__(self):
        if not 0 < self.threshold < 1:
            raise ValueError(f"near_dedup.threshold must be in (0, 1), got {self.threshold!r}")
        for name in ("num_perm", "shingle_words"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"near_dedup.{name} must be a positive int, got {value!r}")
        if not 0 < self.false_negative_weight < 1:
            raise ValueError(f"near_dedup.false_negative_weight must be in (0, 1), got {self.false_negative_weight!r}")


def normalize(text: str) -> str:
    """The text two documents must share to count as exact duplicates."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NON_WORD.sub(" ", text).split())


def exact_signature(text: str, cfg: ExactDedupConfig) -> str:
    data = normalize(text) if cfg.normalize else text
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class ExactIndex:
    """Hashes seen so far -> the first document that had each."""

    def __init__(self):
        self._first: dict[str, str] = {}

    def add(self, doc_id: str, signature: str) -> str | None:
        first = self._first.setdefault(signature, doc_id)
        return None if first == doc_id else first


def shingles(text: str, n: int) -> set[bytes]:
    """Word n-grams of the normalised text (a short text is one shingle)."""
    words = normalize(text).split()
    if len(words) <= n:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def minhash_signature(text: str, cfg: NearDedupConfig) -> np.ndarray:
    """The document's MinHash values (uint32 [num_perm])."""
    from datasketch import MinHash

    m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=_SCHEME)
    m.update_batch(list(shingles(text, cfg.shingle_words)))
    return m.hashvalues.astype(np.uint32)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b))


def lsh_bands(cfg: NearDedupConfig) -> tuple[int, int]:
    """(bands, rows per band) that datasketch picks for the threshold and weights."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm,
                     weights=(1 - cfg.false_negative_weight, cfg.false_negative_weight))
    return lsh.b, lsh.r


def band_keys(signature: np.ndarray, bands: int, rows: int) -> list[bytes]:
    """One bucket key per band: documents sharing any key are candidates."""
    return [bytes([b]) + signature[b * rows:(b + 1) * rows].tobytes() for b in range(bands)]


class NearIndex:
    """MinHash LSH over the documents kept so far (datasketch's MinHashLSH)."""

    def __init__(self, cfg: NearDedupConfig):
        from datasketch import MinHashLSH

        self.cfg = cfg
        self._lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm,
                               weights=(1 - cfg.false_negative_weight, cfg.false_negative_weight))
        self._signatures: dict[str, np.ndarray] = {}

    def add(self, doc_id: str, signature: np.ndarray) -> str | None:
        """The id of an earlier document this one nearly duplicates, or None (then it is indexed)."""
        from datasketch import MinHash

        m = MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed, hashvalues=signature, scheme=_SCHEME)
        best, best_id = -1.0, None
        for other in self._lsh.query(m):
            similarity = estimated_jaccard(signature, self._signatures[other])
            if similarity > best:
                best, best_id = similarity, other
        if best >= self.cfg.threshold:
            return best_id
        if doc_id not in self._signatures:
            self._lsh.insert(doc_id, m)
            self._signatures[doc_id] = signature
        return None
