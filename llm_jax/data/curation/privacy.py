"""Privacy scrubbing: personal data and secrets replaced by typed placeholders, counted.

    <EMAIL>  <PHONE>  <IP_ADDRESS>  <CARD_NUMBER>  <PRIVATE_KEY>  <API_KEY>  <PASSWORD>

Patterns run in a fixed order, most specific first, so one span is replaced once: private
key blocks, then passwords in connection strings (`scheme://user:PASSWORD@host`) and in
`password = "..."` assignments, API keys (the fixed prefixes of AWS, GitHub, Slack,
Google, Stripe and OpenAI-style keys, and long values assigned to names like `api_key`),
e-mail addresses, card numbers (13-19 digits that pass the Luhn checksum: a random digit
run fails it nine times in ten), IP addresses (IPv4 with every octet <= 255, full IPv6),
then phone numbers (10-15 digits with the separators people write, so dates, versions and
plain integers are left alone). Every pattern is linear-time on any input (no nested
quantifiers), so a single enormous line cannot stall a run.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

PLACEHOLDERS = {
    "private_key": "<PRIVATE_KEY>",
    "password": "<PASSWORD>",
    "api_key": "<API_KEY>",
    "email": "<EMAIL>",
    "card_number": "<CARD_NUMBER>",
    "ip_address": "<IP_ADDRESS>",
    "phone": "<PHONE>",
}
KINDS = tuple(PLACEHOLDERS)


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    # Which kinds to scrub (default all, in the fixed order above).
    kinds: Optional[tuple] = None

    def __post_init__(self):
        if self.kinds is not None:
            kinds = tuple(self.kinds)
            unknown = [k for k in kinds if k not in KINDS]
            if unknown or not kinds:
                raise ValueError(f"privacy.kinds has unknown kinds {unknown} (or is empty); known: {list(KINDS)}")
            object.__setattr__(self, "kinds", kinds)


_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
# scheme://user:password@host: the password is replaced, the rest kept (it shows the shape).
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]{1,20}://[^\s:/@]{1,128}:)([^\s@/]{1,256})(@)")
# The keyword may end an identifier (db_password); only the quoted value is replaced.
_ASSIGNED_PASSWORD = re.compile(
    r"""((?:password|passwd|pwd|secret)\w{0,20}["']?\s{0,5}[:=]\s{0,5}["'])([^"'\s]{6,256})(["'])""", re.IGNORECASE)
_API_KEY = re.compile(
    r"\b(?:AKIA[0-9A-Z]{16}"                      # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,255}"             # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{22,255}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,255}"           # Slack
    r"|AIza[0-9A-Za-z_-]{35}"                     # Google API key
    r"|[sr]k_(?:live|test)_[0-9A-Za-z]{16,255}"   # Stripe
    r"|sk-[A-Za-z0-9_-]{20,255})")                # OpenAI-style
_ASSIGNED_KEY = re.compile(
    r"""((?:api[_-]?key|access[_-]?key|secret[_-]?key|auth[_-]?token)\w{0,10}["']?\s{0,5}[:=]\s{0,5}["'])"""
    r"""([A-Za-z0-9_\-+/=.]{16,256})(["'])""", re.IGNORECASE)
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}\b")
# 13-19 digits, optionally grouped by single spaces or dashes; Luhn decides.
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
# Not inside a longer dotted number, but a full stop may end the sentence after it.
_IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                   r"(?!\d|\.\d)")
_IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![0-9A-Fa-f:])")
# Phone numbers, in the shapes that say "phone" (plain runs of space-separated numbers,
# such as years or scores, do not):
#   +CC then groups of 1-8 digits (E.164 and international forms): +14155552671, +44 7700 900123
#   a (area) code in parentheses: (415) 555-2671
#   groups joined by one repeated dash or dot: 1-800-555-0199, 415.555.2671
#   North American 3-3-4 with spaces: 415 555 2671
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,8})){1,6}"
    r"|\(\d{2,4}\)[ .-]?\d{2,4}(?:[ .-]\d{2,5}){0,3}"
    r"|\d{1,4}([.-])\d{2,4}(?:\1\d{2,5}){1,3}"
    r"|\d{3} \d{3} \d{4}"
    r")(?!\w|[ .:-]\d|[.-]\w)")
_DATE = re.compile(r"\d{4}-\d\d-\d\d\b")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum that every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


def _card(match: re.Match) -> bool:
    digits = _digits(match.group())
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _phone(match: re.Match) -> bool:
    text = match.group()
    least = 8 if text.startswith("+") else 10
    return least <= len(_digits(text)) <= 15 and not _DATE.match(text)


# kind -> (pattern, group to replace (0: the whole match), accept(match) or None)
_RULES: dict[str, list[tuple[re.Pattern, int, Optional[Callable[[re.Match], bool]]]]] = {
    "private_key": [(_PRIVATE_KEY, 0, None)],
    "password": [(_URL_PASSWORD, 2, None), (_ASSIGNED_PASSWORD, 2, None)],
    "api_key": [(_API_KEY, 0, None), (_ASSIGNED_KEY, 2, None)],
    "email": [(_EMAIL, 0, None)],
    "card_number": [(_CARD, 0, _card)],
    "ip_address": [(_IPV4, 0, None), (_IPV6, 0, None)],
    "phone": [(_PHONE, 0, _phone)],
}


# A kind's patterns run only if the lower-cased text contains one of these: a substring
# test is ~100x cheaper than a regex scan, and most documents hold no e-mail or key.
_GATES = {
    "private_key": ("private key",),
    "password": ("://", "pass", "pwd", "secret"),
    "api_key": ("akia", "gh", "github_pat_", "xox", "aiza", "k_live_", "k_test_", "sk-", "key", "token"),
    "email": ("@",),
}


def scrub(text: str, cfg: PrivacyConfig = PrivacyConfig()) -> tuple[str, dict[str, int]]:
    """`text` with every match replaced by its kind's placeholder, and the count per kind."""
    counts: dict[str, int] = {}
    lowered = text.lower()
    for kind in cfg.kinds or KINDS:
        if kind in _GATES and not any(g in lowered for g in _GATES[kind]):
            continue
        for pattern, group, accept in _RULES[kind]:
            text, n = _replace(text, pattern, group, accept, PLACEHOLDERS[kind])
            if n:
                counts[kind] = counts.get(kind, 0) + n
    return text, counts


def _replace(text: str, pattern: re.Pattern, group: int, accept, placeholder: str) -> tuple[str, int]:
    n = 0

    def substitute(m: re.Match) -> str:
        nonlocal n
        if accept is not None and not accept(m):
            return m.group()
        n += 1
        if group == 0:
            return placeholder
        whole, start = m.group(), m.start()
        return whole[:m.start(group) - start] + placeholder + whole[m.end(group) - start:]

    return pattern.sub(substitute, text), n
