"""Heuristic quality rules in the style of the published web-corpus recipes.

The rules and their default thresholds follow Gopher's (Rae et al. 2021, appendix A) and
C4's (Raffel et al. 2020) filters: word-count bounds, mean word length, symbol-to-word
ratio, the share of alphabetic text, lines ending in an ellipsis or starting with a
bullet, and repetition (duplicate lines and paragraphs, the most frequent n-gram, text
covered by repeated n-grams). Every threshold is a field of `QualityConfig`; `None`
turns a rule off. `check_quality(text, config)` is a pure function: the first rule that
fails names the removal, with the measured value and the bound in the detail.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import NamedTuple, Optional


class Removal(NamedTuple):
    rule: str
    detail: str


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    min_words: Optional[int] = 50
    max_words: Optional[int] = 100_000
    min_mean_word_length: Optional[float] = 3.0
    max_mean_word_length: Optional[float] = 10.0
    # "#" and ellipses per word: tables of contents, tag clouds, hashtag spam.
    max_symbol_word_ratio: Optional[float] = 0.1
    # Share of words with at least one letter (Gopher: 0.8) and of non-space characters
    # that are letters (catches digit and markup dumps).
    min_alpha_word_fraction: Optional[float] = 0.8
    min_alpha_char_fraction: Optional[float] = None
    max_ellipsis_line_fraction: Optional[float] = 0.3
    max_bullet_line_fraction: Optional[float] = 0.9
    # Longest line allowed (minified code, base64 blobs); off by default.
    max_line_chars: Optional[int] = None
    # Repetition: lines / paragraphs that repeat an earlier one, by count.
    max_duplicate_line_fraction: Optional[float] = 0.3
    max_duplicate_paragraph_fraction: Optional[float] = 0.3
    # Characters of the most frequent n-gram, as a share of all word characters.
    max_top_ngram_fraction: Optional[dict] = dataclasses.field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    # Characters of words covered by an n-gram that occurs more than once.
    max_duplicate_ngram_fraction: Optional[dict] = dataclasses.field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                object.__setattr__(self, f.name, _ngram_bounds(f.name, value))
            elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f"quality.{f.name} must be a non-negative number or null, got {value!r}")
        for low, high in (("min_words", "max_words"), ("min_mean_word_length", "max_mean_word_length")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"quality.{low}={lo} is above quality.{high}={hi}")


def _ngram_bounds(name: str, bounds: dict) -> dict[int, float]:
    out = {}
    for n, fraction in bounds.items():
        try:
            n = int(n)  # JSON object keys are strings
        except (TypeError, ValueError):
            raise ValueError(f"quality.{name} keys must be n-gram sizes, got {n!r}") from None
        if n < 1 or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ValueError(f"quality.{name}[{n}] must be a fraction in [0, 1] for n >= 1, got {fraction!r}")
        out[n] = float(fraction)
    return out


_BULLETS = ("•", "●", "○", "▪", "‣", "◦", "-", "*", "–")
_ELLIPSES = ("...", "…")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def check_quality(text: str, cfg: QualityConfig) -> Removal | None:
    """The first rule `text` fails, or None if it passes them all."""
    words = text.split()
    for rule in (_word_rules, _line_rules, _repetition_rules):
        removal = rule(text, words, cfg)
        if removal is not None:
            return removal
    return None


def _bound(rule: str, value: float, low: float | None, high: float | None) -> Removal | None:
    if low is not None and value < low:
        return Removal(rule, f"{value:.3g} < min {low:g}")
    if high is not None and value > high:
        return Removal(rule, f"{value:.3g} > max {high:g}")
    return None


def _word_rules(text: str, words: list[str], cfg: QualityConfig) -> Removal | None:
    n = len(words)
    removal = _bound("word_count", n, cfg.min_words, cfg.max_words)
    if removal or n == 0:
        return removal or Removal("word_count", "no words")
    checks = [("mean_word_length", sum(map(len, words)) / n, cfg.min_mean_word_length, cfg.max_mean_word_length)]
    if cfg.max_symbol_word_ratio is not None:
        symbols = text.count("#") + sum(text.count(e) for e in _ELLIPSES)
        checks.append(("symbol_word_ratio", symbols / n, None, cfg.max_symbol_word_ratio))
    if cfg.min_alpha_word_fraction is not None:
        alpha = sum(1 for w in words if any(c.isalpha() for c in w))
        checks.append(("alpha_word_fraction", alpha / n, cfg.min_alpha_word_fraction, None))
    if cfg.min_alpha_char_fraction is not None:
        chars = sum(map(len, words))
        letters = sum(1 for w in words for c in w if c.isalpha())
        checks.append(("alpha_char_fraction", letters / chars, cfg.min_alpha_char_fraction, None))
    for rule, value, low, high in checks:
        removal = _bound(rule, value, low, high)
        if removal:
            return removal
    return None


def _line_rules(text: str, words: list[str], cfg: QualityConfig) -> Removal | None:
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line] or [""]
    if cfg.max_line_chars is not None:
        longest = max(map(len, text.splitlines() or [""]))
        if longest > cfg.max_line_chars:
            return Removal("line_length", f"a line of {longest:,} chars > max {cfg.max_line_chars:,}")
    checks = []
    if cfg.max_ellipsis_line_fraction is not None:
        share = sum(line.endswith(_ELLIPSES) for line in lines) / len(lines)
        checks.append(("ellipsis_lines", share, cfg.max_ellipsis_line_fraction))
    if cfg.max_bullet_line_fraction is not None:
        share = sum(line.startswith(_BULLETS) for line in lines) / len(lines)
        checks.append(("bullet_lines", share, cfg.max_bullet_line_fraction))
    if cfg.max_duplicate_line_fraction is not None:
        checks.append(("duplicate_lines", _repeated_fraction(lines), cfg.max_duplicate_line_fraction))
    if cfg.max_duplicate_paragraph_fraction is not None:
        paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()] or [""]
        checks.append(("duplicate_paragraphs", _repeated_fraction(paragraphs), cfg.max_duplicate_paragraph_fraction))
    for rule, value, high in checks:
        removal = _bound(rule, value, None, high)
        if removal:
            return removal
    return None


def _repeated_fraction(items: list[str]) -> float:
    """Share of items that repeat an earlier item."""
    return (len(items) - len(set(items))) / len(items)


def _repetition_rules(text: str, words: list[str], cfg: QualityConfig) -> Removal | None:
    lowered = [w.lower() for w in words]
    total_chars = sum(map(len, lowered)) or 1
    for n, high in sorted((cfg.max_top_ngram_fraction or {}).items()):
        if len(lowered) >= n:
            removal = _bound(f"top_{n}gram", _top_ngram_fraction(lowered, n, total_chars), None, high)
            if removal:
                return removal
    for n, high in sorted((cfg.max_duplicate_ngram_fraction or {}).items()):
        if len(lowered) >= n:
            removal = _bound(f"duplicate_{n}grams", _duplicate_ngram_fraction(lowered, n, total_chars), None, high)
            if removal:
                return removal
    return None


def _ngrams(words: list[str], n: int):
    return zip(*(words[i:] for i in range(n)))


def _top_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    gram, count = Counter(_ngrams(words, n)).most_common(1)[0]
    return count * sum(map(len, gram)) / total_chars


def _duplicate_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    grams = list(_ngrams(words, n))
    counts = Counter(grams)
    covered = bytearray(len(words))  # 1 where a word lies inside a repeated n-gram
    for start, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[start:start + n] = b"\1" * n
    return sum(len(w) for w, c in zip(words, covered) if c) / total_chars
