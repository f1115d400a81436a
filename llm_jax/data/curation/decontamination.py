"""Decontamination: drop training documents that share a long n-gram with an evaluation set.

Following GPT-3 (Brown et al. 2020, appendix C), both sides are lower-cased and reduced
to words (punctuation dropped), and a training document is contaminated when it contains
any `n`-word sequence (default 13) that also occurs in an evaluation document. Evaluation
documents shorter than `n` words contribute their whole word sequence as one n-gram, so
short questions are still caught; those shorter than `min_words` (default 8) contribute
nothing, since a few common words are no evidence of a leak (a one-word answer would
otherwise remove every training document that contains the word).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

from llm_jax.data.curation.dedup import normalize


@dataclasses.dataclass(frozen=True)
class DecontaminationConfig:
    eval_path: Optional[str] = None  # a JSONL file, a directory of files, or a text file (one per line)
    ngram: int = 13
    text_field: str = "text"
    # Contaminated when at least this many distinct eval n-grams occur in the document.
    min_matches: int = 1
    # Evaluation documents of fewer words are not matched at all (see the module docstring).
    min_words: int = 8

    def __post_init__(self):
        if not self.eval_path:
            raise ValueError("decontamination.eval_path is required: the evaluation set to protect")
        for name in ("ngram", "min_matches", "min_words"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"decontamination.{name} must be a positive int, got {value!r}")


def eval_ngrams(texts: Iterable[str], n: int, min_words: int = 8) -> frozenset[str]:
    """Every n-gram of the evaluation texts; a text of min_words..n-1 words is one gram."""
    grams = set()
    for text in texts:
        words = normalize(text).split()
        if min_words <= len(words) < n:
            grams.add(" ".join(words))
        grams.update(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    return frozenset(grams)


def contamination(text: str, grams: frozenset[str], n: int, min_matches: int = 1,
                  short_grams: frozenset[int] = frozenset()) -> tuple[int, str] | None:
    """(matches, first shared n-gram) when `text` shares >= `min_matches` eval n-grams."""
    words = normalize(text).split()
    found: set[str] = set()
    lengths = {n} | set(short_grams)
    for length in sorted(lengths, reverse=True):
        for i in range(len(words) - length + 1):
            gram = " ".join(words[i:i + length])
            if gram in grams:
                found.add(gram)
                if len(found) >= min_matches:
                    return len(found), gram
    return None
