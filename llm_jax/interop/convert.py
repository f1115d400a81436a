"""Hugging Face checkpoint directories <-> llm_jax params, and <-> llm_jax run directories.

    load_hf_checkpoint(hf_dir, mesh)          -> (ModelConfig, params)
    save_hf_checkpoint(params, cfg, out_dir)  config.json + safetensors (+ tokenizer files)
    convert_from_hf(hf_dir, run_dir)          run_dir/checkpoints/0 + run_dir/tokenizer/
    convert_to_hf(run_dir, out_dir)           the reverse, from a run's newest (or given) step
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings

import jax

from llm_jax.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from llm_jax.data.tokenizers import Tokenizer, load_tokenizer
from llm_jax.interop import weights
from llm_jax.interop.families import FAMILIES
from llm_jax.interop.hf_config import InteropError, family_of, read_hf_config, to_hf_config, to_model_config
from llm_jax.interop.tokenizer import KIND, HFTokenizer, has_hf_tokenizer

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # save_pretrained's historical "5GB"


def load_hf_checkpoint(hf_dir, mesh: jax.sharding.Mesh | None = None, *, scan_layers: bool = True,
                       param_dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """Read a Hugging Face checkpoint directory into (ModelConfig, params).

    Params land in their `param_shardings(cfg, mesh)` shardings, or on the first device
    without a mesh. `param_dtype` defaults to the stored one (bfloat16 if every weight
    is bf16, else float32).
    """
    hf_dir = pathlib.Path(hf_dir)
    hf = read_hf_config(hf_dir)
    family = family_of(hf)  # refuse an unsupported model before looking at the weights
    if param_dtype not in (None, *weights.NP_DTYPES):
        raise InteropError(f"param_dtype={param_dtype!r} is not supported; choose one of "
                           f"{', '.join(weights.NP_DTYPES)}")
    stored = weights.read_headers(weights.safetensors_files(hf_dir))
    cfg = to_model_config(hf, scan_layers=scan_layers)
    plan = weights.plan_import(family, cfg, stored)  # the dtype changes no name or shape
    dtype = param_dtype or weights.stored_param_dtype([stored[name] for name in plan])
    cfg = dataclasses.replace(cfg, param_dtype=dtype)
    return cfg, weights.load_weights(plan, stored, cfg, mesh)


def save_hf_checkpoint(params, cfg: ModelConfig, out_dir, *, tokenizer: HFTokenizer | None = None,
                       dtype: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                       special_ids: Tokenizer | None = None) -> pathlib.Path:
    """Write params as a directory `transformers.AutoModelForCausalLM.from_pretrained` loads.

    config.json takes its bos/eos/pad ids from `tokenizer` (whose files are written too) or,
    for a tokenizer with no Hugging Face form, from `special_ids` (ids only).
    """
    dtype = dtype or cfg.param_dtype
    if dtype not in weights.NP_DTYPES:
        raise InteropError(f"dtype={dtype!r} is not supported; choose one of {', '.join(weights.NP_DTYPES)}")
    hf = to_hf_config(cfg)  # refuses a model no family expresses, before anything is written
    hf["torch_dtype"] = dtype
    ids_from = tokenizer if tokenizer is not None else special_ids
    if ids_from is not None:
        hf.update(bos_token_id=ids_from.bos_id, eos_token_id=ids_from.eos_id, pad_token_id=ids_from.pad_id)
    out_dir = pathlib.Path(out_dir)
    if (out_dir / "config.json").exists() or any(out_dir.glob("*.safetensors*")):
        raise InteropError(f"{out_dir} already holds a checkpoint; export into a new or empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    weights.save_weights(params, cfg, FAMILIES[hf["model_type"]], out_dir, dtype=dtype,
                         max_shard_bytes=max_shard_bytes)
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_hf(out_dir)
    return out_dir


# ------------------------------------------------------------------------ run directories


def write_run_dir(run_dir, params, model: ModelConfig, tokenizer: HFTokenizer | None = None, *, step: int = 0,
                  name: str = "hf_import") -> pathlib.Path:
    """An llm_jax run directory that `load_trained_model` (and `llm-jax generate`) read.

    The checkpoint holds the parameters and step only: no optimizer state or data
    iterator, so it serves inference and evaluation, not `llm-jax train`'s resume.
    """
    from llm_jax.training.checkpoint import save_model_checkpoint

    run_dir = pathlib.Path(run_dir).absolute()
    checkpoints = run_dir / "checkpoints"
    if checkpoints.exists() and any(checkpoints.iterdir()):
        raise InteropError(f"{checkpoints} already holds checkpoints; convert into a new directory")
    config = ExperimentConfig(
        name=name,
        model=model,
        data=DataConfig(seq_len=min(DataConfig.seq_len, model.max_seq_len)),
        train=TrainConfig(run_dir=str(run_dir)),
    )
    save_model_checkpoint(run_dir, config, params, step=step)
    if tokenizer is not None:
        tokenizer.save(run_dir / "tokenizer")
    return run_dir


def convert_from_hf(hf_dir, run_dir, *, mesh=None, scan_layers: bool = True,
                    param_dtype: str | None = None) -> pathlib.Path:
    """A Hugging Face checkpoint directory -> an llm_jax run directory (step 0 + tokenizer)."""
    hf_dir = pathlib.Path(hf_dir)
    cfg, params = load_hf_checkpoint(hf_dir, mesh, scan_layers=scan_layers, param_dtype=param_dtype)
    tokenizer = None
    if has_hf_tokenizer(hf_dir):
        tokenizer = HFTokenizer.load(hf_dir)
    else:
        warnings.warn(f"{hf_dir} has no tokenizer.json or tokenizer.model: the run directory gets no tokenizer/",
                      stacklevel=2)
    name = f"hf_{family_of(read_hf_config(hf_dir)).model_type}"
    return write_run_dir(run_dir, params, cfg, tokenizer, name=name)


def convert_to_hf(run_dir, out_dir, *, step: int | None = None, dtype: str | None = None,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """An llm_jax run directory's checkpoint -> a Hugging Face checkpoint directory."""
    from llm_jax.training.checkpoint import load_trained_model

    config, params, _ = load_trained_model(run_dir, step=step)
    tokenizer, ours = _run_tokenizer(pathlib.Path(run_dir) / "tokenizer")
    return save_hf_checkpoint(params, config.model, out_dir, tokenizer=tokenizer, dtype=dtype,
                              max_shard_bytes=max_shard_bytes, special_ids=ours)


def _run_tokenizer(directory: pathlib.Path) -> tuple[HFTokenizer | None, Tokenizer | None]:
    """(the run's tokenizer if it is a Hugging Face one, else None; else the run's own
    tokenizer, whose special ids the exported config still needs)."""
    meta = directory / "tokenizer.json"
    if not meta.is_file():
        warnings.warn(f"{directory} holds no tokenizer: the export has weights and config only", stacklevel=3)
        return None, None
    kind = json.loads(meta.read_text(encoding="utf-8")).get("kind")
    if kind != KIND:
        warnings.warn(f"the run's tokenizer is of kind {kind!r}, which has no Hugging Face form; the export has "
                      f"weights and config, with the tokenizer's bos/eos/pad ids, but no tokenizer files (only "
                      f"tokenizers imported from Hugging Face are written back)", stacklevel=3)
        return None, load_tokenizer(directory)
    return HFTokenizer.load(directory), None
