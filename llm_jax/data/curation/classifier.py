"""A small, fast text classifier: hashed word n-grams and logistic regression.

Features are the document's lower-cased word unigrams and bigrams (fastText's recipe,
without the embedding layer), hashed into `n_features` buckets with CRC-32 (stable
across processes and machines, unlike Python's salted `hash`), weighted by log(1 + count)
and L2-normalised. Logistic regression with an L2 penalty and balanced class weights is
fitted by scipy's L-BFGS on a sparse matrix. Scoring one document is a sparse dot product:
tens of microseconds, so the classifier can score every document of a corpus.

Used for quality (good = reference-quality text such as curated articles, bad = random
crawl) and for toxicity (good = clean, bad = toxic); `score` is P(good).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import zlib
from typing import Optional, Sequence

import numpy as np

_WORD = re.compile(r"\w+")


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    good: Optional[str] = None  # example files (JSONL, a directory, or one example per line)
    bad: Optional[str] = None
    model: Optional[str] = None  # or a model saved by HashedNgramClassifier.save
    threshold: float = 0.5  # keep documents with P(good) >= threshold
    n_features: int = 1 << 18
    word_ngrams: int = 2
    l2: float = 1e-4
    text_field: str = "text"

    def __post_init__(self):
        if self.model is not None and (self.good is not None or self.bad is not None):
            raise ValueError("classifier takes 'model' or 'good' and 'bad' example files, not both (a saved "
                             "model is not retrained, so the examples would be ignored)")
        if self.model is None and (self.good is None or self.bad is None):
            raise ValueError("classifier needs either 'model' (a saved classifier) or both 'good' and 'bad' "
                             "example files")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"classifier.threshold must be in [0, 1], got {self.threshold!r}")
        if not isinstance(self.n_features, int) or self.n_features < 2:
            raise ValueError(f"classifier.n_features must be an int >= 2, got {self.n_features!r}")
        if not isinstance(self.word_ngrams, int) or not 1 <= self.word_ngrams <= 5:
            raise ValueError(f"classifier.word_ngrams must be 1..5, got {self.word_ngrams!r}")


def features(text: str, n_features: int, word_ngrams: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(bucket indices, weights) of one document's hashed n-grams; the weights have unit L2 norm."""
    words = _WORD.findall(text.lower())
    grams = list(words)
    for n in range(2, word_ngrams + 1):
        grams += [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    buckets = np.fromiter((zlib.crc32(g.encode()) for g in grams), np.int64, len(grams)) % n_features
    index, counts = np.unique(buckets, return_counts=True)
    weights = np.log1p(counts).astype(np.float32)
    return index, weights / np.linalg.norm(weights)


@dataclasses.dataclass(frozen=True)
class HashedNgramClassifier:
    weights: np.ndarray  # float32 [n_features]
    bias: float
    word_ngrams: int = 2

    @property
    def n_features(self) -> int:
        return self.weights.shape[0]

    def score(self, text: str) -> float:
        """P(good | text)."""
        index, values = features(text, self.n_features, self.word_ngrams)
        logit = float(values @ self.weights[index]) + self.bias
        return float(1 / (1 + np.exp(-np.clip(logit, -50, 50))))

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        path = pathlib.Path(path)
        meta = json.dumps({"bias": self.bias, "word_ngrams": self.word_ngrams})
        with open(path, "wb") as f:
            np.savez_compressed(f, weights=self.weights, meta=np.array(meta))
        return path

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "HashedNgramClassifier":
        path = pathlib.Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"classifier model {path} does not exist")
        with np.load(path) as saved:
            meta = json.loads(str(saved["meta"]))
            return cls(weights=saved["weights"], bias=float(meta["bias"]), word_ngrams=int(meta["word_ngrams"]))


def train_classifier(good: Sequence[str], bad: Sequence[str], *, n_features: int = 1 << 18, word_ngrams: int = 2,
                     l2: float = 1e-4, max_iterations: int = 200) -> HashedNgramClassifier:
    """Logistic regression on hashed n-grams; the classes are weighted equally whatever their sizes."""
    import scipy.optimize
    import scipy.sparse

    if not good or not bad:
        raise ValueError(f"a classifier needs good and bad examples; got {len(good)} good and {len(bad)} bad")
    rows = [features(t, n_features, word_ngrams) for t in list(good) + list(bad)]
    indptr = np.cumsum([0] + [len(i) for i, _ in rows])
    x = scipy.sparse.csr_matrix((np.concatenate([v for _, v in rows]), np.concatenate([i for i, _ in rows]), indptr),
                                shape=(len(rows), n_features), dtype=np.float64)
    y = np.concatenate([np.ones(len(good)), np.zeros(len(bad))])
    sample_weight = np.where(y == 1, 0.5 / len(good), 0.5 / len(bad))

    def loss_and_grad(theta):
        w, b = theta[:-1], theta[-1]
        logits = x @ w + b
        # log(1 + e^z) - y z, stably.
        losses = np.logaddexp(0, logits) - y * logits
        residual = sample_weight * (1 / (1 + np.exp(-logits)) - y)
        loss = float(sample_weight @ losses) + 0.5 * l2 * float(w @ w)
        return loss, np.concatenate([x.T @ residual + l2 * w, [residual.sum()]])

    result = scipy.optimize.minimize(loss_and_grad, np.zeros(n_features + 1), jac=True, method="L-BFGS-B",
                                     options={"maxiter": max_iterations})
    return HashedNgramClassifier(weights=result.x[:-1].astype(np.float32), bias=float(result.x[-1]),
                                 word_ngrams=word_ngrams)
