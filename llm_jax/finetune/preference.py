"""Preference pairs and prompt lists from JSONL, encoded as `Sequences` for alignment.

    {"prompt": "...", "chosen": "...", "rejected": "..."}     one pair per line (reward, DPO)
    {"prompt": "..."}                                          one prompt per line (PPO)

Every problem is reported as `path, line N: what is wrong`: a line that is not JSON or not
an object, a missing or non-string field, an empty prompt or response, a pair whose two
responses are identical (it carries no preference). Blank lines are skipped.

Each response is followed by the tokenizer's end-of-sequence id, so a policy tuned on
the pairs also learns where to stop. A response that does not fit `max_len` after its
prompt is cut and counted (`PreferenceData.truncated`); a prompt that leaves no room
for a response is an error.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Iterator, Sequence

import jax
import numpy as np

from llm_jax.data.jsonl import jsonl_records
from llm_jax.finetune.sequences import Sequences, pack

_WIDTH_BUCKET = 16  # sequence widths are rounded up to this, to limit recompilation


class PreferenceDataError(ValueError):
    """A JSONL line (or a pair built in code) is malformed; the message names the line."""


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    line: int = 0  # 1-based line of the JSONL file it came from; 0 when built in code


def read_jsonl_records(path: str | pathlib.Path, fields: Sequence[str]) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line; every `field` must be a non-empty string."""
    records = []
    for number, record in jsonl_records(path, PreferenceDataError, "preference data file",
                                        locate=lambda number: f"{path}, line {number}"):
        if not isinstance(record, dict):
            raise PreferenceDataError(f"{path}, line {number}: expected a JSON object with fields "
                                      f"{list(fields)}, got {type(record).__name__}")
        for field in fields:
            if field not in record:
                raise PreferenceDataError(f"{path}, line {number}: missing field {field!r} "
                                          f"(required: {list(fields)}; found: {sorted(record)})")
            value = record[field]
            if not isinstance(value, str):
                raise PreferenceDataError(f"{path}, line {number}: field {field!r} must be a string, "
                                          f"got {type(value).__name__}")
            if not value.strip():
                raise PreferenceDataError(f"{path}, line {number}: field {field!r} is empty; "
                                          f"{'a prompt' if field == 'prompt' else 'a response'} must have text")
        records.append((number, record))
    if not records:
        raise PreferenceDataError(f"{path}: holds no records")
    return records


def read_preference_pairs(path: str | pathlib.Path) -> list[PreferencePair]:
    """The pairs of a JSONL file with `prompt`, `chosen` and `rejected` on every line."""
    pairs = []
    for number, r in read_jsonl_records(path, ("prompt", "chosen", "rejected")):
        if r["chosen"] == r["rejected"]:
            raise PreferenceDataError(f"{path}, line {number}: 'chosen' and 'rejected' are identical; "
                                      f"the pair expresses no preference")
        pairs.append(PreferencePair(r["prompt"], r["chosen"], r["rejected"], line=number))
    return pairs


def read_prompts(path: str | pathlib.Path) -> list[str]:
    """The `prompt` field of every line (other fields, e.g. of a pairs file, are ignored)."""
    return [r["prompt"] for _, r in read_jsonl_records(path, ("prompt",))]


# ---------------------------------------------------------------------------- encoding


@dataclasses.dataclass(frozen=True)
class PreferenceData:
    """Encoded pairs: row i of `chosen` and of `rejected` share a prompt (and a width)."""

    chosen: Sequences
    rejected: Sequences
    truncated: int = 0  # pairs with a response cut to fit max_len

    @property
    def num_pairs(self) -> int:
        return self.chosen.num_rows

    def rows(self, index) -> "PreferenceData":
        return PreferenceData(self.chosen.rows(index), self.rejected.rows(index), self.truncated)

    def split(self, validation_fraction: float, seed: int) -> tuple["PreferenceData", "PreferenceData | None"]:
        """(train, held out): a seeded random `validation_fraction` of the pairs is held out."""
        n_held = int(round(self.num_pairs * validation_fraction))
        if n_held == 0:
            return self, None
        if n_held >= self.num_pairs:
            raise PreferenceDataError(f"validation_fraction={validation_fraction} holds out all "
                                      f"{self.num_pairs} pairs; nothing is left to train on")
        order = np.random.default_rng(seed).permutation(self.num_pairs)
        return self.rows(np.sort(order[n_held:])), self.rows(np.sort(order[:n_held]))


def _width(longest: int, max_len: int) -> int:
    return min(max_len, -(-longest // _WIDTH_BUCKET) * _WIDTH_BUCKET)


def preference_data(prompts: Sequence[Sequence[int]], chosen: Sequence[Sequence[int]],
                    rejected: Sequence[Sequence[int]], max_len: int, *, pad_id: int = 0,
                    lines: Sequence[int] | None = None) -> PreferenceData:
    """Token-id pairs -> `PreferenceData`; responses cut to fit `max_len` are counted."""
    if not (len(prompts) == len(chosen) == len(rejected)) or not prompts:
        raise PreferenceDataError(f"need equally many prompts, chosen and rejected responses (at least one); "
                                  f"got {len(prompts)}, {len(chosen)}, {len(rejected)}")
    where = lambda i: f"line {lines[i]}" if lines else f"pair {i}"  # noqa: E731
    truncated, cut_chosen, cut_rejected = 0, [], []
    for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
        if not p:
            raise PreferenceDataError(f"{where(i)}: the prompt encodes to no tokens")
        if not c or not r:
            raise PreferenceDataError(f"{where(i)}: the {'chosen' if not c else 'rejected'} response is empty")
        room = max_len - len(p)
        if room < 1:
            raise PreferenceDataError(f"{where(i)}: the prompt's {len(p)} tokens leave no room for a response "
                                      f"within max_len={max_len}")
        truncated += len(c) > room or len(r) > room
        cut_chosen.append(list(c)[:room])
        cut_rejected.append(list(r)[:room])
        if cut_chosen[-1] == cut_rejected[-1]:
            raise PreferenceDataError(f"{where(i)}: the chosen and rejected responses are the same within "
                                      f"max_len={max_len} ({room} response tokens after the prompt), so the pair "
                                      f"teaches nothing; raise max_len or drop the pair")
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, cut_chosen, cut_rejected))
    width = _width(longest, max_len)
    prompts = [list(p) for p in prompts]
    return PreferenceData(pack(prompts, cut_chosen, width, pad_id), pack(prompts, cut_rejected, width, pad_id),
                          truncated)


def encode_pairs(pairs: Sequence[PreferencePair], tokenizer, max_len: int) -> PreferenceData:
    """Tokenize text pairs (each response followed by the tokenizer's eos id)."""
    for pair in pairs:
        for field in ("chosen", "rejected"):
            if not getattr(pair, field).strip():
                where = f"line {pair.line}" if pair.line else "a pair"
                raise PreferenceDataError(f"{where}: field {field!r} is empty; a response must have text")
    eos = [tokenizer.eos_id]
    return preference_data(
        [tokenizer.encode(p.prompt) for p in pairs],
        [tokenizer.encode(p.chosen) + eos for p in pairs],
        [tokenizer.encode(p.rejected) + eos for p in pairs],
        max_len,
        pad_id=tokenizer.pad_id,
        lines=[p.line for p in pairs] if all(p.line for p in pairs) else None,
    )


def index_batches(num_rows: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless batches of row indices: seeded epoch permutations, cut into batches back to back."""
    rng = np.random.default_rng(seed)
    buffer = np.zeros((0,), np.int64)
    while True:
        while len(buffer) < batch_size:
            buffer = np.concatenate([buffer, rng.permutation(num_rows)])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


class IntervalLog:
    """Per-step metrics (device arrays, fetched only when logged) averaged every `every`
    steps and at step `last`; `history` keeps each logged average with its step."""

    def __init__(self, every: int, last: int):
        self.every, self.last = every, last
        self.history: list[dict] = []
        self._pending: list[dict] = []

    def add(self, step: int, metrics: dict) -> dict | None:
        """Record one step; returns the averages when this step closes an interval, else None."""
        self._pending.append(metrics)
        if step % self.every and step != self.last:
            return None
        fetched, self._pending = jax.device_get(self._pending), []
        logged = {"step": step, **{k: float(np.mean([m[k] for m in fetched])) for k in metrics}}
        self.history.append(logged)
        return logged
