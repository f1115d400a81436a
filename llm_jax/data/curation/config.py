"""The chain configuration: which filters run, in what order, with which thresholds.

A chain is JSON (or the equivalent Python dict):

    {"input": {"max_document_chars": 1000000},
     "steps": [{"filter": "quality", "min_words": 20},
               {"filter": "privacy"},
               {"filter": "exact_dedup"},
               {"filter": "near_dedup", "threshold": 0.8},
               {"filter": "toxicity", "word_list": "bad_words.txt", "max_density": 0.005},
               {"filter": "classifier", "id": "toxic_classifier", "good": "clean.jsonl", "bad": "toxic.jsonl"}]}

Each step's keys are the fields of its filter's frozen config dataclass (validated when it
is built); `id` names the step in the report (default: the filter name; two steps of one
filter need distinct ids). Unknown filter names and unknown keys are refused with the
known ones listed. Relative paths in a chain file are relative to the file.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Literal, Mapping, Sequence

from llm_jax.data.curation.classifier import ClassifierConfig
from llm_jax.data.curation.decontamination import DecontaminationConfig
from llm_jax.data.curation.dedup import ExactDedupConfig, NearDedupConfig
from llm_jax.data.curation.privacy import PrivacyConfig
from llm_jax.data.curation.quality import QualityConfig
from llm_jax.data.curation.toxicity import ToxicityConfig

FILTERS: dict[str, type] = {
    "quality": QualityConfig,
    "classifier": ClassifierConfig,
    "exact_dedup": ExactDedupConfig,
    "near_dedup": NearDedupConfig,
    "decontamination": DecontaminationConfig,
    "privacy": PrivacyConfig,
    "toxicity": ToxicityConfig,
}
# Fields that name files, resolved against the chain file's directory.
_PATH_FIELDS = frozenset({"good", "bad", "model", "eval_path", "word_list"})


class ChainConfigError(ValueError):
    """A chain configuration is invalid; the message names the step and key."""


@dataclasses.dataclass(frozen=True)
class InputConfig:
    # Longer documents are removed (input:too_long) before any filter sees them: one
    # enormous line would otherwise cost every rule time and memory.
    max_document_chars: int = 1_000_000
    # Documents with fewer non-whitespace characters are removed as input:empty.
    min_document_chars: int = 1
    # "remove": documents that are not valid UTF-8 are removed (input:invalid_utf8);
    # "replace": their bad bytes become U+FFFD and they go on.
    invalid_utf8: Literal["remove", "replace"] = "remove"

    def __post_init__(self):
        for name in ("max_document_chars", "min_document_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ChainConfigError(f"input.{name} must be a positive int, got {value!r}")
        if self.invalid_utf8 not in ("remove", "replace"):
            raise ChainConfigError(f"input.invalid_utf8 must be 'remove' or 'replace', got {self.invalid_utf8!r}")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    filter: str
    id: str
    settings: Any  # the filter's config dataclass


@dataclasses.dataclass(frozen=True)
class ChainConfig:
    steps: tuple[StepConfig, ...]
    input: InputConfig = InputConfig()

    def __post_init__(self):
        ids = [s.id for s in self.steps]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ChainConfigError(f"step ids {repeated} are used twice; give repeated filters distinct 'id's")
        if "input" in ids:
            raise ChainConfigError("step id 'input' is reserved for the input checks")

    def to_dict(self) -> dict:
        return {"input": dataclasses.asdict(self.input),
                "steps": [{"filter": s.filter, "id": s.id, **dataclasses.asdict(s.settings)} for s in self.steps]}


def _build(cls: type, values: Mapping[str, Any], where: str):
    """`cls(**values)`, refusing unknown keys and naming `where` in every error."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ChainConfigError(f"{where}: unknown keys {unknown}; {cls.__name__} takes {known}")
    try:
        return cls(**values)
    except ChainConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ChainConfigError(f"{where}: {e}") from None


def parse_chain(spec: Mapping[str, Any] | Sequence[Mapping[str, Any]], base_dir: str | pathlib.Path | None = None
                ) -> ChainConfig:
    """A ChainConfig from a dict (or a bare list of steps), as read from JSON."""
    if isinstance(spec, Sequence) and not isinstance(spec, (str, bytes)):
        spec = {"steps": list(spec)}
    if not isinstance(spec, Mapping):
        raise ChainConfigError(f"a chain is an object with 'steps' (or a list of steps), got {type(spec).__name__}")
    unknown = sorted(set(spec) - {"input", "steps"})
    if unknown:
        raise ChainConfigError(f"chain: unknown keys {unknown}; a chain has 'input' and 'steps'")
    steps = spec.get("steps")
    if not isinstance(steps, Sequence) or isinstance(steps, (str, bytes)):
        raise ChainConfigError("chain: 'steps' must be a list of {'filter': NAME, ...} objects")
    return ChainConfig(steps=tuple(_parse_step(s, k, base_dir) for k, s in enumerate(steps)),
                       input=_build(InputConfig, spec.get("input", {}), "input"))


def _parse_step(step: Any, k: int, base_dir) -> StepConfig:
    if not isinstance(step, Mapping) or "filter" not in step:
        raise ChainConfigError(f"steps[{k}] must be an object with a 'filter' key, got {step!r}")
    values = dict(step)
    name = values.pop("filter")
    step_id = values.pop("id", name)
    if name not in FILTERS:
        raise ChainConfigError(f"steps[{k}]: unknown filter {name!r}; known filters: {sorted(FILTERS)}")
    if not isinstance(step_id, str) or not re.fullmatch(r"[A-Za-z][\w.-]*", step_id):
        raise ChainConfigError(f"steps[{k}]: id must be a name (letters, digits, _ . -), got {step_id!r}")
    if base_dir is not None:
        for key in _PATH_FIELDS & set(values):
            if isinstance(values[key], str):
                values[key] = str(pathlib.Path(base_dir, pathlib.Path(values[key]).expanduser()))
    return StepConfig(filter=name, id=step_id, settings=_build(FILTERS[name], values, f"steps[{k}] ({step_id})"))


# Chains that need no files of the user's, by name (`llm-jax prepare --chain NAME`).
PRESETS: dict[str, dict] = {
    # Prose from the web: the Gopher/C4 rules with their published thresholds.
    "web": {"steps": [{"filter": "quality"}, {"filter": "privacy"}, {"filter": "exact_dedup"},
                      {"filter": "near_dedup"}]},
    # Source code: the prose rules do not apply; only lines that no code has (minified
    # files, data blobs) and heavy repetition are removed.
    "code": {"steps": [
        {"filter": "quality", "min_words": 10, "max_words": None, "min_mean_word_length": None,
         "max_mean_word_length": None, "max_symbol_word_ratio": None, "min_alpha_word_fraction": None,
         "max_ellipsis_line_fraction": None, "max_bullet_line_fraction": None, "max_line_chars": 1000,
         "max_duplicate_line_fraction": None, "max_duplicate_paragraph_fraction": None,
         "max_top_ngram_fraction": None, "max_duplicate_ngram_fraction": {"10": 0.6}},
        # Punctuation is code: `a + b` and `a - b` are different programs.
        {"filter": "privacy"}, {"filter": "exact_dedup", "normalize": False}, {"filter": "near_dedup"}]},
}


def load_chain(spec: str | pathlib.Path | Mapping | Sequence) -> ChainConfig:
    """A preset name, a path to a JSON chain file, or an already-parsed dict/list."""
    if isinstance(spec, (Mapping, list, tuple)):
        return parse_chain(spec)
    if str(spec) in PRESETS:
        return parse_chain(PRESETS[str(spec)])
    path = pathlib.Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"chain {spec!r} is neither a preset ({sorted(PRESETS)}) nor a JSON file")
    try:
        parsed = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ChainConfigError(f"chain file {path} is not valid JSON: {e}") from None
    return parse_chain(parsed, base_dir=path.parent)
