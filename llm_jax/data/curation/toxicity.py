"""Toxic and biased text: documents dense in terms from a word list the user supplies.

A term matches as a whole word or phrase, case-insensitively ("ass" does not match
"class"). A document is removed when it has at least `min_matches` matches and they make
up more than `max_density` of its words, so one quoted slur in a long article can be
kept while a rant is not (set `max_density: 0` to remove on any match). For a learned
filter, add a `classifier` step trained on the user's toxic (bad) and clean (good) examples.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ToxicityConfig:
    word_list: Optional[str] = None  # a text file, one term or phrase per line; '#' starts a comment
    max_density: float = 0.01
    min_matches: int = 1

    def __post_init__(self):
        if not self.word_list:
            raise ValueError("toxicity.word_list is required: a file of terms, one per line")
        if not isinstance(self.max_density, (int, float)) or not 0 <= self.max_density < 1:
            raise ValueError(f"toxicity.max_density must be in [0, 1), got {self.max_density!r}")
        if not isinstance(self.min_matches, int) or self.min_matches < 1:
            raise ValueError(f"toxicity.min_matches must be a positive int, got {self.min_matches!r}")


def read_word_list(path: str | pathlib.Path) -> list[str]:
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"toxicity word list {path} does not exist")
    terms = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        term = line.split("#", 1)[0].strip()
        if term:
            terms.append(" ".join(term.split()))
    if not terms:
        raise ValueError(f"toxicity word list {path} has no terms (one per line; '#' starts a comment)")
    return terms


def term_pattern(terms: list[str]) -> re.Pattern:
    """Whole-word, case-insensitive; longest first so a phrase wins over its first word."""
    alternatives = sorted({re.escape(t).replace(r"\ ", r"\s+") for t in terms}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def toxic_matches(text: str, pattern: re.Pattern, cfg: ToxicityConfig) -> tuple[int, float] | None:
    """(matches, density) when `text` is over the thresholds, else None."""
    matches = sum(1 for _ in pattern.finditer(text))
    if matches < cfg.min_matches:
        return None
    density = matches / max(1, len(text.split()))
    return (matches, density) if density > cfg.max_density else None
