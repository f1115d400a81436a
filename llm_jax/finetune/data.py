"""Instruction-tuning data: JSONL conversations -> chat template -> packed, response-masked rows.

Each JSONL line is one example, in either of two shapes:

    {"instruction": "...", "input": "...", "output": "..."}     ("input" optional; Alpaca)
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}

An instruction example becomes the conversation user: instruction (+ blank line + input),
assistant: output. A conversation is rendered with a `ChatTemplate`, and the loss counts
only the assistant turns' tokens (each followed by the end-of-sequence id, so the model
learns to stop); prompts, system text and the template's own markers are not trained on.

Examples are packed first-fit into rows of `seq_len` tokens (grain's
`FirstFitPackIterDataset`): an example is never split across rows, positions restart at 0
and segment ids keep packed examples from attending to each other.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import grain
import grain.experimental
import numpy as np

from llm_jax.data.jsonl import jsonl_records
from llm_jax.data.tokenizers import Tokenizer

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad SFT example; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """How a conversation is laid out as text. `{content}` is replaced by a message's text.

    The assistant's content is followed by the tokenizer's end-of-sequence id (not text),
    then `assistant_end`.
    """

    system: str
    user: str
    assistant_start: str  # text ahead of an assistant turn (not trained on)
    assistant_end: str = ""

    def prompt(self, messages: Sequence[dict]) -> str:
        """The text of `messages` (no assistant turn at the end) plus the assistant's cue, for generation."""
        return "".join(self._turn(m) for m in messages) + self.assistant_start

    def _turn(self, message: dict) -> str:
        if message["role"] == "assistant":
            raise ValueError("prompt(): the messages to complete must not include assistant turns")
        return getattr(self, message["role"]).format(content=message["content"])


# The default template: plain-text markers that any tokenizer can spell (byte fallback for
# the rest), so a base model trained on raw text needs no new vocabulary.
TEMPLATES = {
    "default": ChatTemplate(
        system="### System:\n{content}\n\n",
        user="### User:\n{content}\n\n",
        assistant_start="### Assistant:\n",
        assistant_end="\n\n",
    ),
    "chatml": ChatTemplate(
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_start="<|im_start|>assistant\n",
        assistant_end="<|im_end|>\n",
    ),
    "alpaca": ChatTemplate(
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n",
        assistant_start="### Response:\n",
        assistant_end="\n\n",
    ),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


# --------------------------------------------------------------------------- reading


def _as_messages(record, where: str) -> list[dict]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: messages[{i}] needs 'role' and 'content'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: messages[{i}] has role {m['role']!r}; roles are {', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: messages[{i}].content must be a string")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message, so nothing to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    missing = [k for k in ("instruction", "output") if k not in record]
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r} (an example needs 'instruction' and 'output', "
                        f"optionally 'input', or a 'messages' list)")
    for k in ("instruction", "input", "output"):
        if k in record and not isinstance(record[k], str):
            raise DataError(f"{where}: field {k!r} must be a string")
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def read_jsonl(path: str | pathlib.Path) -> list[list[dict]]:
    """Every example of a JSONL file as a list of messages; a bad line raises with its number."""
    examples = [_as_messages(record, f"{path}:{number}")
                for number, record in jsonl_records(path, DataError, "SFT data file")]
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


# -------------------------------------------------------------------------- encoding


def encode_prompt(messages: Sequence[dict], template: ChatTemplate, tokenizer: Tokenizer) -> list[int]:
    """Token ids of a conversation so far plus the assistant's cue: what a tuned model completes.

    Earlier assistant turns are encoded as in training (with their EOS ids), so a
    multi-turn prompt looks to the model exactly like the start of a training example.
    """
    ids, _ = encode(messages, template, tokenizer)
    return ids.tolist() + tokenizer.encode(template.assistant_start)


def encode(messages: Sequence[dict], template: ChatTemplate, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, response mask): the mask is 1 on assistant content and its closing EOS."""
    ids: list[int] = []
    mask: list[int] = []

    def add(text: str, trained: bool):
        piece = tokenizer.encode(text) if text else []
        ids.extend(piece)
        mask.extend([int(trained)] * len(piece))

    for m in messages:
        if m["role"] == "assistant":
            add(template.assistant_start, False)
            add(m["content"], True)
            ids.append(tokenizer.eos_id)
            mask.append(1)
            add(template.assistant_end, False)
        else:
            add(getattr(template, m["role"]).format(content=m["content"]), False)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


class _Encode:
    """Picklable example -> next-token inputs/targets with the loss on response targets."""

    def __init__(self, template: ChatTemplate, tokenizer: Tokenizer, seq_len: int, train_on_prompt: bool):
        self.template, self.tokenizer, self.seq_len, self.train_on_prompt = template, tokenizer, seq_len, train_on_prompt

    def __call__(self, messages):
        ids, mask = encode(messages, self.template, self.tokenizer)
        ids, mask = ids[: self.seq_len + 1], mask[: self.seq_len + 1]  # over-long examples keep their start
        loss = np.ones_like(mask[1:]) if self.train_on_prompt else mask[1:]
        return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": loss}


def sft_batches(examples: Sequence[list[dict]], tokenizer: Tokenizer, template: ChatTemplate, *, seq_len: int,
                batch_size: int, train: bool, seed: int = 0, train_on_prompt: bool = False,
                process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Packed batches: dicts of int32 [batch_size, seq_len] `inputs`, `targets`, `loss_mask`,
    `segment_ids`, `positions`. Training repeats and reshuffles every epoch; evaluation is
    one pass (a last partial batch is kept, padded with empty rows)."""
    if not examples:
        raise ValueError("no SFT examples to batch")
    ds = grain.MapDataset.source(list(examples))
    if train:
        ds = ds.shuffle(seed=seed)
    ds = ds[process_index::process_count]
    if train:
        ds = ds.repeat(None)
    ds = ds.map(_Encode(template, tokenizer, seq_len, train_on_prompt)).to_iter_dataset()
    packed = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len},
        num_packing_bins=batch_size, shuffle_bins=train, seed=seed)
    batches = packed.map(_model_row).batch(batch_size, drop_remainder=train)
    # Evaluation keeps its last batch whole: padded with empty rows (no loss, segment 0).
    return batches if train else batches.map(lambda b: _pad_rows(b, batch_size))


def _pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    return {k: np.pad(v, [(0, rows - v.shape[0])] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


def _model_row(row: dict) -> dict[str, np.ndarray]:
    segments = row["inputs_segment_ids"].astype(np.int32)
    return {
        "inputs": row["inputs"].astype(np.int32),
        "targets": row["targets"].astype(np.int32),
        "loss_mask": (row["loss_mask"] * (segments > 0)).astype(np.int32),
        "segment_ids": segments,
        "positions": row["inputs_positions"].astype(np.int32),
    }
