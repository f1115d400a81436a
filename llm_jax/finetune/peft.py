"""Parameter-efficient tuning around the model: tuned vs frozen parameters, their optimizer,
QLoRA's quantized base, LoRA merging, and composing a tuned checkpoint with its base.

A PEFT model's parameters are the base model's plus the method's own (`llm_jax.models.peft`
names them: `lora`, `adapter_*`, `prefix`, `soft_prompt`). Training splits them in two:

    tuned  = split(params)[0]    differentiated, optimized, checkpointed
    frozen = split(params)[1]    the base weights (NF4 codes for QLoRA); an input of the step

so gradients and optimizer state exist for the tuned parameters only, and a tuned run's
checkpoint holds just those, with `train.init_from` naming the base run they belong to.
`combine(tuned, frozen)` is the full tree that a plain `Transformer(cfg).apply` runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib

import flax.traverse_util as traverse
import jax
import optax

from llm_jax.config import ModelConfig, PeftConfig
from llm_jax.models import abstract_params, init_params, param_logical_axes
from llm_jax.models.lora import NF4Tensor, lora_delta, quantize_nf4
from llm_jax.models.peft import TUNED_NAMES


def _tuned_key(cfg: ModelConfig, path: tuple[str, ...]) -> bool:
    return cfg.peft.method == "none" or any(k in TUNED_NAMES for k in path)


def _flat(tree) -> dict:
    return traverse.flatten_dict(tree, is_leaf=lambda _, x: not isinstance(x, dict))


def split(params, cfg: ModelConfig):
    """(tuned, frozen) halves of a PEFT model's parameters; full fine-tuning tunes them all."""
    flat = _flat(params)
    tuned = {k: v for k, v in flat.items() if _tuned_key(cfg, k)}
    frozen = {k: v for k, v in flat.items() if not _tuned_key(cfg, k)}
    return traverse.unflatten_dict(tuned), traverse.unflatten_dict(frozen)


def combine(tuned, frozen):
    """The whole parameter tree back from `split`'s halves."""
    return traverse.unflatten_dict({**_flat(frozen), **_flat(tuned)})


def tuned_mask(params, cfg: ModelConfig):
    """True on the leaves that train, shaped like `params` (for optax masks and labels)."""
    return traverse.unflatten_dict({k: _tuned_key(cfg, k) for k in _flat(params)})


def tuned_only(tx: optax.GradientTransformation, cfg: ModelConfig) -> optax.GradientTransformation:
    """`tx` on the tuned leaves of a whole parameter tree; frozen leaves get no update and no state.

    For code that keeps the whole tree in one state; `llm_jax.finetune.step` instead
    differentiates the tuned half alone, which also saves the frozen weights' gradients.
    """
    labels = lambda params: jax.tree.map(lambda t: "tuned" if t else "frozen", tuned_mask(params, cfg))  # noqa: E731
    return optax.multi_transform({"tuned": tx, "frozen": optax.set_to_zero()}, labels)


def count_tuned(cfg: ModelConfig) -> tuple[int, int]:
    """(tuned, total) parameter counts of a PEFT config, from shapes only."""
    tuned, frozen = split(abstract_params(cfg), cfg)
    n_tuned = sum(x.size for x in jax.tree.leaves(tuned))
    return n_tuned, n_tuned + sum(x.size for x in jax.tree.leaves(frozen))


# ------------------------------------------------------------------- building from a base


def plain(cfg: ModelConfig) -> ModelConfig:
    """The base model a PEFT config tunes."""
    return dataclasses.replace(cfg, peft=PeftConfig())


def check_base(base_params, cfg: ModelConfig) -> None:
    """Refuse base parameters that are not `plain(cfg)`'s tree, naming the first difference."""
    expected = _flat(abstract_params(plain(cfg)))
    given = _flat(base_params)
    if set(expected) != set(given):
        missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
        raise ValueError(f"the base parameters do not fit the model config: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for k, v in expected.items():
        if tuple(v.shape) != tuple(given[k].shape):
            raise ValueError(f"base parameter {'/'.join(k)} has shape {tuple(given[k].shape)}, the model expects "
                             f"{tuple(v.shape)}")


def attach(base_params, cfg: ModelConfig, rng: jax.Array):
    """A PEFT model's (tuned, frozen) from base parameters: fresh tuned ones, the base frozen.

    For QLoRA the frozen kernels come back as NF4. Full fine-tuning (method none) tunes the
    base itself: (base, {}).
    """
    check_base(base_params, cfg)
    if cfg.peft.method == "none":
        return base_params, {}
    tuned = init_tuned(cfg, rng)
    frozen = jax.jit(quantize_base, static_argnums=1)(base_params, cfg) if cfg.peft.method == "qlora" else base_params
    return tuned, frozen


@functools.partial(jax.jit, static_argnums=0)
def init_tuned(cfg: ModelConfig, rng: jax.Array):
    """Fresh parameters of the PEFT method alone (the base's initialisation is pruned away)."""
    return split(init_params(cfg, rng), cfg)[0]


def quantize_base(frozen, cfg: ModelConfig):
    """QLoRA's frozen base: every projection kernel as NF4, grouped along its contraction axis."""
    from llm_jax.inference.quantize import contraction_axis

    axes = _flat(param_logical_axes(plain(cfg)))

    def one(path, w):
        if path[-1] != "kernel":
            return w  # embeddings, norms and biases stay in full precision
        names = tuple(axes[path])
        axis = contraction_axis(names)
        return w if axis is None else quantize_nf4(w, axis, cfg.peft.qlora_group_size)

    return traverse.unflatten_dict({k: one(k, v) for k, v in _flat(frozen).items()})


def frozen_shardings(frozen, shardings):
    """Shardings for the frozen half; an NF4 kernel's codes and scales follow the kernel's."""

    def one(w, s: jax.sharding.NamedSharding):
        if not isinstance(w, NF4Tensor):
            return s
        spec = list(s.spec) + [None] * (w.scale.ndim - len(s.spec))
        axis = w.axis % w.scale.ndim
        entry = spec[axis]
        ways = math.prod(s.mesh.shape[a] for a in (() if entry is None else (entry,) if isinstance(entry, str) else entry))
        if w.scale.shape[axis] % ways:
            spec[axis] = None  # fewer groups than devices on that axis: keep the scales whole there
        return NF4Tensor(codes=s, scale=jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec)),
                         axis=w.axis)

    flat_s = _flat(shardings)
    return traverse.unflatten_dict({k: one(w, flat_s[k]) for k, w in _flat(frozen).items()})


# ------------------------------------------------------------------------------ LoRA merge


def _lora_layers(params):
    """(path of the Dense, its params) for every Dense carrying a LoRA update."""
    flat = _flat(params)
    for k in sorted({k[: k.index("lora")] for k in flat if "lora" in k}):
        yield k


def merge_lora(params, cfg: ModelConfig):
    """(plain config, parameters) with every LoRA update folded into its kernel, for serving.

    QLoRA kernels are dequantized first: the merged model is a plain full-precision one.
    """
    if not cfg.peft.uses_lora:
        raise ValueError(f"merge_lora needs model.peft.method lora or qlora, got {cfg.peft.method!r}")
    flat = _flat(params)
    scale = cfg.peft.lora_alpha / cfg.peft.lora_rank
    for layer in _lora_layers(params):
        kernel = flat[layer + ("kernel",)]
        if isinstance(kernel, NF4Tensor):
            kernel = kernel.dequantize()
        a, b = flat.pop(layer + ("lora", "a")), flat.pop(layer + ("lora", "b"))
        flat[layer + ("kernel",)] = (kernel + lora_delta(a, b, kernel.ndim, scale)).astype(kernel.dtype)
    return plain(cfg), traverse.unflatten_dict(flat)


def unmerge_lora(merged, lora_params, cfg: ModelConfig):
    """The base parameters back from `merge_lora`'s output and the LoRA factors (`split(...)[0]`)."""
    flat, lora = _flat(merged), _flat(lora_params)
    scale = cfg.peft.lora_alpha / cfg.peft.lora_rank
    for layer in _lora_layers(lora_params):
        kernel = flat[layer + ("kernel",)]
        a, b = lora[layer + ("lora", "a")], lora[layer + ("lora", "b")]
        flat[layer + ("kernel",)] = (kernel - lora_delta(a, b, kernel.ndim, scale)).astype(kernel.dtype)
    return traverse.unflatten_dict(flat)


# --------------------------------------------------------------------- tuned checkpoints


def base_run_dir(config) -> pathlib.Path:
    """The base run a tuned run's checkpoint refers to (its `train.init_from`)."""
    if not config.train.init_from:
        raise ValueError(f"a model.peft.method={config.model.peft.method!r} checkpoint names no base run "
                         f"(train.init_from is empty), so its frozen parameters cannot be found")
    return pathlib.Path(config.train.init_from)


def with_base(tuned, config, mesh: jax.sharding.Mesh | None = None):
    """The full parameters of a tuned checkpoint: its tuned half plus its base run's weights."""
    from llm_jax.training.checkpoint import load_trained_model

    base_dir = base_run_dir(config)
    if not (base_dir / "checkpoints").is_dir():
        raise FileNotFoundError(f"the base run {base_dir} of this tuned checkpoint (train.init_from) is missing")
    base_cfg, base_params, _ = load_trained_model(base_dir, mesh=mesh)
    if base_cfg.model.peft.method != "none":
        raise ValueError(f"the base run {base_dir} is itself a PEFT run; tuning on top of one is not supported")
    frozen = quantize_base(base_params, config.model) if config.model.peft.method == "qlora" else base_params
    return combine(tuned, frozen)
