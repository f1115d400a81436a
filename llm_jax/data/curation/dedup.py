"""Deduplication: exact (a hash of normalised text) and near (MinHash + LSH, datasketch).

Both are split into a pure part and a stateful part, so the pure part runs in worker
processes (or Beam workers) and only a small index lives in one place:

    signature(text) -> hashable / MinHash values       pure, parallel
    index.add(ordinal, id, signature) -> dup of?       sequential, in input order

The first document of a group of duplicates is kept; the others are removed with the
id of the document they duplicate. Near duplicates are found by MinHash over word
n-gram shingles (Broder 1997): the fraction of equal MinHash values estimates the
Jaccard similarity of two documents' shingle sets, and locality-sensitive hashing
(bands of values) proposes candidates without comparing every pair. A candidate counts
only if its Jaccard similarity reaches the threshold: exactly, from the shingle hashes
(`verify="exact"`, the default; precision is then 1 by construction), or as MinHash
estimates it (`verify="estimate"`, less memory). The LSH bands are tuned to favour recall.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sys
import unicodedata
from typing import Literal

import numpy as np

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
    # How an LSH candidate is confirmed: "exact" Jaccard of the shingle sets (each kept
    # document's 32-bit shingle hashes stay in memory, ~4 bytes per word), or the MinHash
    # "estimate" (num_perm values per document only, but a pair within ~2 standard errors
    # of the threshold can fall either side).
    verify: Literal["exact", "estimate"] = "exact"

    def __post_init__(self):
        if not 0 < self.threshold < 1:
            raise ValueError(f"near_dedup.threshold must be in (0, 1), got {self.threshold!r}")
        for name in ("num_perm", "shingle_words"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"near_dedup.{name} must be a positive int, got {value!r}")
        if not 0 < self.false_negative_weight < 1:
            raise ValueError(f"near_dedup.false_negative_weight must be in (0, 1), got {self.false_negative_weight!r}")
        if self.verify not in ("exact", "estimate"):
            raise ValueError(f"near_dedup.verify must be 'exact' or 'estimate', got {self.verify!r}")


@functools.cache
def _punctuation_table() -> dict[int, str]:
    """Every punctuation, symbol and control character (but "_") -> a space. Combining marks
    stay: in Devanagari or Thai they are the vowels ("दिन", day, and "दान", gift, differ
    only in theirs), and regex's \\w does not count them as word characters."""
    return {cp: " " for cp in range(sys.maxunicode + 1)
            if unicodedata.category(chr(cp))[0] in "PSC" and cp != ord("_")}


def normalize(text: str) -> str:
    """The text two documents must share to count as exact duplicates: NFKC, case-folded,
    punctuation and symbols dropped, whitespace runs joined."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(text.translate(_punctuation_table()).split())


def exact_signature(text: str, cfg: ExactDedupConfig) -> str:
    data = normalize(text) if cfg.normalize else text
    return hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class ExactIndex:
    """Hashes seen so far -> the first document that had each."""

    def __init__(self):
        self._first: dict[str, str] = {}

    def find(self, signature: str) -> str | None:
        """The id of the recorded document with this hash, or None."""
        return self._first.get(signature)

    def insert(self, ordinal: int, doc_id: str, signature: str) -> None:
        del ordinal  # the hash is the key; input order decides which document comes first
        self._first.setdefault(signature, doc_id)

    def add(self, ordinal: int, doc_id: str, signature: str) -> str | None:
        """`find`, and `insert` when there is no earlier document."""
        first = self.find(signature)
        if first is None:
            self.insert(ordinal, doc_id, signature)
        return first


def shingles(text: str, n: int) -> set[bytes]:
    """Word n-grams of the normalised text (a short text is one shingle)."""
    words = normalize(text).split()
    if len(words) <= n:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclasses.dataclass(frozen=True, eq=False)  # arrays: no element-wise __eq__ surprises
class NearSignature:
    minhash: np.ndarray  # uint32 [num_perm]
    shingles: np.ndarray | None  # sorted distinct uint32 shingle hashes (verify="exact")


def _hash32(shingle: bytes) -> int:
    return int.from_bytes(hashlib.sha1(shingle).digest()[:4], "little")  # what datasketch hashes with


def _identity(value: int) -> int:  # the shingles arrive hashed (module level: it pickles)
    return value


def minhash_signature(text: str, cfg: NearDedupConfig) -> NearSignature:
    """The document's MinHash values and, to verify candidates exactly, its shingle hashes."""
    from datasketch import MinHash

    hashes = np.unique(np.fromiter(map(_hash32, shingles(text, cfg.shingle_words)), np.uint32))
    m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, scheme=_SCHEME, hashfunc=_identity)
    m.update_batch(hashes.tolist())
    return NearSignature(m.hashvalues.astype(np.uint32), hashes if cfg.verify == "exact" else None)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The share of equal MinHash values: an unbiased estimate of the Jaccard similarity."""
    return float(np.mean(a == b))


def similarity(a: NearSignature, b: NearSignature) -> float:
    """Exact Jaccard of the shingle sets when both have them, else the MinHash estimate."""
    if a.shingles is None or b.shingles is None:
        return estimated_jaccard(a.minhash, b.minhash)
    shared = np.intersect1d(a.shingles, b.shingles, assume_unique=True).size
    return shared / (a.shingles.size + b.shingles.size - shared)


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
        # Keyed by ordinal, which is unique even when documents' ids are not.
        self._signatures: dict[int, tuple[str, NearSignature]] = {}

    def _minhash(self, signature: NearSignature):
        from datasketch import MinHash

        return MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed, hashvalues=signature.minhash, scheme=_SCHEME)

    def find(self, signature: NearSignature) -> str | None:
        """The id of the indexed document this one most nearly duplicates, or None."""
        best, best_id = -1.0, None
        for other in self._lsh.query(self._minhash(signature)):
            other_id, other_signature = self._signatures[other]
            score = similarity(signature, other_signature)
            if score > best:
                best, best_id = score, other_id
        return best_id if best >= self.cfg.threshold else None

    def insert(self, ordinal: int, doc_id: str, signature: NearSignature) -> None:
        self._lsh.insert(ordinal, self._minhash(signature))
        self._signatures[ordinal] = (doc_id, signature)

    def add(self, ordinal: int, doc_id: str, signature: NearSignature) -> str | None:
        """`find`, and `insert` when there is no earlier document."""
        first = self.find(signature)
        if first is None:
            self.insert(ordinal, doc_id, signature)
        return first
