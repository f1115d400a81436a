"""config.json <-> ModelConfig, by walking a family's `Key` table (see `families.py`).

Import reads both the transformers 4 layout (`rope_theta` + `rope_scaling`) and the
transformers 5 one (`rope_parameters`); export writes the 4 layout, which both read.
Export then reads its own output back and refuses a ModelConfig the family cannot
express (ALiBi, parallel blocks, Llama with MLP biases ...), naming the fields.
"""

from __future__ import annotations

import json
import pathlib
import typing

from llm_jax.config import ConfigError, ModelConfig, to_dict
from llm_jax.interop.families import FAMILIES, REQUIRED, ROPE_TYPES, Family, Key, export_family

CONFIG_FILE = "config.json"


class InteropError(ValueError):
    """A checkpoint, config or tokenizer cannot be converted; the message says which part and why."""


def read_hf_config(hf_dir: str | pathlib.Path) -> dict:
    path = pathlib.Path(hf_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{hf_dir} has no {CONFIG_FILE}: a Hugging Face checkpoint directory holds config.json and "
            f"model.safetensors (or model.safetensors.index.json and its shards)")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InteropError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise InteropError(f"{path} holds a JSON {type(hf).__name__}, not an object of model settings")
    return hf


def family_of(hf: dict) -> Family:
    """The table for this config.json, refusing model types and heads we do not read."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        supported = ", ".join(f"{f.model_type} ({f.architecture})" for f in FAMILIES.values())
        raise InteropError(f"config.json: model_type={model_type!r} (architectures={hf.get('architectures')}) is "
                           f"not supported; supported model types: {supported}")
    family = FAMILIES[model_type]
    architectures = hf.get("architectures") or [family.architecture]
    if list(architectures) != [family.architecture]:
        raise InteropError(f"config.json: architectures={architectures} is not supported for model_type "
                           f"{model_type!r}; only the causal language model {family.architecture} is read")
    return family


# ------------------------------------------------------------------------------ import


def to_model_config(hf: dict, *, param_dtype: str = "float32", scan_layers: bool = True) -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json (a dict)."""
    family = family_of(hf)
    fields = dict(family.fixed)
    for key in family.keys:
        value = _key_value(hf, key, family)
        if key.field is not None:
            fields[key.field] = value
    if family.rope:
        fields.update(_rope_fields(hf))
    if family.sliding_window:
        fields["sliding_window"] = _sliding_window(hf, family)
    fields.update(param_dtype=param_dtype, scan_layers=scan_layers)
    try:
        cfg = ModelConfig(**_coerce(fields))
    except ConfigError as e:
        raise InteropError(f"config.json (model_type {family.model_type!r}) gives an invalid model: {e}") from None
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != cfg.head_dim:
        raise InteropError(f"config.json: head_dim={head_dim} differs from hidden_size / num_attention_heads = "
                           f"{cfg.head_dim}; llm_jax derives the head size as d_model // n_heads")
    return cfg


def _key_value(hf: dict, key: Key, family: Family):
    value = hf.get(key.hf)
    if value is None:
        if key.default is REQUIRED:
            raise InteropError(f"config.json has no {key.hf!r}, which model_type {family.model_type!r} requires")
        value = key.default(hf) if callable(key.default) else key.default
    if key.values is None:
        return value
    if value not in key.values:
        why = f": {key.why}" if key.why else ""
        raise InteropError(f"config.json: {key.hf}={value!r} is not supported for model_type {family.model_type!r} "
                           f"(allowed: {', '.join(map(repr, key.values))}){why}")
    return key.values[value]


def _rope_parameters(hf: dict) -> dict:
    """transformers 5's `rope_parameters`, or the same built from 4's rope_theta + rope_scaling."""
    if hf.get("rope_parameters") is not None:
        return dict(hf["rope_parameters"])
    params = dict(hf.get("rope_scaling") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
    return params


def _rope_fields(hf: dict) -> dict:
    params = _rope_parameters(hf)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise InteropError(f"config.json: rope_type={kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    scaling, names = ROPE_TYPES[kind]
    unknown = sorted(set(params) - set(names) - {"rope_type", "type", "rope_theta"})
    missing = sorted(set(names) - set(params))
    if unknown or missing:
        raise InteropError(f"config.json: rope_type={kind!r} with parameters {sorted(params)}: "
                           f"unsupported {unknown}, missing {missing}; llm_jax reads {sorted(names)}")
    fields = {"rope_scaling": scaling, "rope_theta": params["rope_theta"]}
    fields.update({ours: params[theirs] for theirs, ours in names.items()})
    return fields


def _sliding_window(hf: dict, family: Family) -> int | None:
    """One window for every layer, or None; per-layer mixes are refused."""
    window = hf.get("sliding_window", 4096)  # Mistral's and Qwen2's default
    n_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None and family.sliding_window_switch is None:
        return window
    if layer_types is None:  # Qwen2 before transformers 5: layers from max_window_layers on slide
        slide = hf.get(family.sliding_window_switch, False)
        first = hf.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if slide and i >= first else "full_attention" for i in range(n_layers)]
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"} and window is not None:
        return window
    raise InteropError(f"config.json: layer_types={sorted(kinds)} with sliding_window={window} is not supported; "
                       f"llm_jax applies one sliding_window (or none) to every layer")


def _coerce(fields: dict) -> dict:
    """JSON numbers to the field's type (8 -> 8.0 for a float), so configs compare and round-trip."""
    hints = typing.get_type_hints(ModelConfig)
    out = dict(fields)
    for name, value in fields.items():
        tp = hints[name]
        if tp in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InteropError(f"config.json: the value behind model.{name} must be a number, got {value!r}")
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            out[name] = float(value)
        elif tp is int and isinstance(value, float) and value.is_integer():
            out[name] = int(value)
    return out


# ------------------------------------------------------------------------------ export

# Fields that change training or placement, never a model's outputs: not part of the fit.
_NOT_IN_CHECKPOINT = ("dropout", "attention_dropout", "init_std", "scan_layers", "remat", "attention", "dtype",
                      "param_dtype")


def to_hf_config(cfg: ModelConfig) -> dict:
    """config.json for `cfg`, written as the family that fits it; unfit fields are refused."""
    qkv_bias = cfg.use_bias if cfg.qkv_bias is None else cfg.qkv_bias
    family = export_family(cfg.position, qkv_bias, cfg.sliding_window)
    hf = {"architectures": [family.architecture], "model_type": family.model_type}
    for key in family.keys:
        if key.field is not None or key.default is REQUIRED:
            hf[key.hf] = _export_value(cfg, key, family)
        # else: a feature our model lacks, which Hugging Face's default already switches off
    if family.rope:
        hf.update(rope_theta=cfg.rope_theta, head_dim=cfg.head_dim)
        if cfg.rope_scaling != "none":
            kind = next(k for k, (scaling, _) in ROPE_TYPES.items() if scaling == cfg.rope_scaling)
            hf["rope_scaling"] = {"rope_type": kind, **{k: getattr(cfg, f) for k, f in ROPE_TYPES[kind][1].items()}}
    if family.sliding_window:
        hf["sliding_window"] = cfg.sliding_window
        if family.sliding_window_switch:
            hf[family.sliding_window_switch] = cfg.sliding_window is not None
            hf["max_window_layers"] = 0
    hf["torch_dtype"] = cfg.param_dtype
    _check_fit(cfg, to_model_config(hf, param_dtype=cfg.param_dtype, scan_layers=cfg.scan_layers), family)
    return hf


def _export_value(cfg: ModelConfig, key: Key, family: Family):
    if key.field is None:
        return next(iter(key.values))  # the one setting that matches our model
    value = cfg.kv_heads if key.field == "n_kv_heads" else getattr(cfg, key.field)
    if key.values is None:
        return value
    for theirs, ours in key.values.items():
        if ours == value:
            return theirs
    raise InteropError(f"model.{key.field}={value!r} cannot be written as model_type {family.model_type!r}: "
                       f"its {key.hf} allows {', '.join(map(repr, key.values))} "
                       f"(model.{key.field} {', '.join(map(repr, key.values.values()))})")


def _fit_fields(cfg: ModelConfig) -> dict:
    """The fields that decide the outputs, with those that the others make moot left out."""
    fields = {k: v for k, v in to_dict(cfg).items() if k not in _NOT_IN_CHECKPOINT}
    fields.update(n_kv_heads=cfg.kv_heads, qkv_bias=cfg.use_bias if cfg.qkv_bias is None else cfg.qkv_bias)
    moot = []
    if cfg.position != "rope":
        moot += ["rope_theta", "rope_scaling"]
    if cfg.position != "rope" or cfg.rope_scaling == "none":
        moot += ["rope_scaling_factor"]
    if cfg.position != "rope" or cfg.rope_scaling != "llama3":
        moot += ["rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"]
    if cfg.position != "relative":
        moot += ["relative_buckets", "relative_max_distance"]
    return {k: v for k, v in fields.items() if k not in moot}


def _check_fit(cfg: ModelConfig, back: ModelConfig, family: Family) -> None:
    ours, theirs = _fit_fields(cfg), _fit_fields(back)
    diff = [f"model.{k}={ours[k]!r} (would read back as {theirs.get(k)!r})"
            for k in ours if ours[k] != theirs.get(k)]
    if diff:
        raise InteropError(f"this model has no Hugging Face equivalent as model_type {family.model_type!r}: "
                           f"{'; '.join(diff)}")

