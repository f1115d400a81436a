"""Safetensors <-> llm_jax parameters, one tensor at a time.

Import first reads only the file headers (names, shapes, dtypes) and checks them against
what config.json implies, so a missing, extra or misshapen tensor fails before anything
is allocated. Then each tensor is read on the host, transformed (`families.Transform`),
cast to the parameter dtype and `device_put` straight into its `NamedSharding` (or onto
one device): the host holds one tensor at a time, the devices only their shards.

The scanned layer stack is the one place where many stored tensors make one array
(`layers/.../kernel` is [L, ...]). It is preallocated, sharded, as zeros, and each
layer's slice is written into it by a jitted `dynamic_update_index_in_dim` that donates
the stack, so the update happens in place: device memory holds the stack once plus one
layer slice, the host one layer. (`jax.make_array_from_callback` would instead ask the
host for every device's whole shard of the stack at once: with no pipeline split that
is all L layers of the tensor, on the host together.)

Export walks the same tables backwards, writing shards of at most `max_shard_bytes`
(planned from the shapes before any array is fetched) and an index when there are more
than one, as `save_pretrained` does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

try:
    from safetensors import safe_open
    from safetensors.numpy import save_file
except ImportError as e:  # an optional dependency
    raise ImportError(f'{e}: Hugging Face interop needs the hf extra, pip install -e ".[hf]"') from e

from llm_jax.config import ModelConfig
from llm_jax.interop.families import Family, Rule
from llm_jax.interop.hf_config import InteropError
from llm_jax.models import abstract_params

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Pickle-based formats: loading them runs code from the file, so they are refused.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}
_MAX_LISTED = 8  # problems listed in one error


@dataclasses.dataclass(frozen=True)
class Stored:
    """A tensor in a safetensors file, known from the header alone."""

    file: pathlib.Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, F16, ...


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a stored tensor goes: a rule, its layer (None: not per layer), our shapes."""

    rule: Rule
    layer: int | None
    shapes: tuple[tuple[int, ...], ...]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(self.rule.transform.hf_shape(list(self.shapes)))


# ------------------------------------------------------------------------------- files


def safetensors_files(hf_dir: pathlib.Path) -> list[pathlib.Path]:
    """The checkpoint's safetensors files (sharded via the index, or one file)."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InteropError(f"{index} is not a safetensors index: it needs a \"weight_map\" of tensor name -> "
                               f"shard file ({type(e).__name__}: {e})") from None
        names = list(dict.fromkeys(weight_map.values()))
        absent = [n for n in names if not (hf_dir / n).is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are not in {hf_dir}: {', '.join(absent)}")
        return [hf_dir / n for n in names]
    if (hf_dir / SINGLE_FILE).is_file():
        return [hf_dir / SINGLE_FILE]
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in hf_dir.glob(pattern))
    if pickles:
        raise InteropError(
            f"{hf_dir} holds only pickled weights ({', '.join(pickles)}); llm_jax loads safetensors only, because "
            f"unpickling a checkpoint can execute arbitrary code. Convert it where you trust it, e.g. "
            f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)")
    raise FileNotFoundError(f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def read_headers(files: list[pathlib.Path]) -> dict[str, Stored]:
    stored = {}
    for file in files:
        with safe_open(file, framework="flax") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                stored[name] = Stored(file, tuple(piece.get_shape()), piece.get_dtype())
    return stored


def stored_param_dtype(stored: list[Stored]) -> str:
    """bfloat16 when every weight is stored so, else float32 (f16 widens without loss)."""
    return "bfloat16" if {s.dtype for s in stored} == {"BF16"} else "float32"


# -------------------------------------------------------------------------------- plan


def _flat(tree, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _shapes(cfg: ModelConfig) -> tuple[dict, dict]:
    """Our parameter shapes: (not per layer, one layer), as flat path -> shape."""
    tree = abstract_params(dataclasses.replace(cfg, scan_layers=True))
    tree = dict(tree)
    layer = {p: s.shape[1:] for p, s in _flat(tree.pop("layers")).items()}
    return {p: s.shape for p, s in _flat(tree).items()}, layer


def expected_tensors(family: Family, cfg: ModelConfig) -> dict[str, Target]:
    """Every stored tensor this config needs, by Hugging Face name, in table order."""
    top, layer = _shapes(cfg)
    expected, covered = {}, set()
    for rule in family.tensors:
        pool = layer if rule.per_layer else top
        if not all(p in pool for p in rule.paths):
            continue  # e.g. biases of a model without them
        shapes = tuple(tuple(pool[p]) for p in rule.paths)
        covered.update((rule.per_layer, p) for p in rule.paths)
        for i in range(cfg.n_layers) if rule.per_layer else [None]:
            expected[rule.hf if i is None else rule.hf.format(i=i)] = Target(rule, i, shapes)
    uncovered = [p for p in top if (False, p) not in covered] + [p for p in layer if (True, p) not in covered]
    if uncovered:
        raise InteropError(f"model_type {family.model_type!r} stores no tensor for our parameters {uncovered}")
    return expected


def plan_import(family: Family, cfg: ModelConfig, stored: dict[str, Stored]) -> dict[str, Target]:
    """Stored name -> Target, after checking names and shapes; refuses with every problem found."""
    expected = expected_tensors(family, cfg)
    ignored = [re.compile(p) for p in family.ignored]
    plan, problems = {}, []
    for name, s in stored.items():
        key = name if name in expected else family.optional_prefix + name
        if key in expected:
            plan[name] = expected[key]
            if s.shape != plan[name].hf_shape:
                problems.append(f"tensor {name!r} has shape {s.shape} but config.json implies "
                                f"{plan[name].hf_shape} (for our {', '.join(plan[name].rule.paths)})")
        elif not any(p.fullmatch(key) or p.fullmatch(name) for p in ignored):
            problems.append(f"unexpected tensor {name!r} of shape {s.shape}: model_type {family.model_type!r} "
                            f"with this config.json has no such weight")
    found = {name if name in expected else family.optional_prefix + name for name in plan}
    for name in sorted(expected.keys() - found):
        problems.append(f"missing tensor {name!r} of shape {expected[name].hf_shape} "
                        f"(for our {', '.join(expected[name].rule.paths)})")
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise InteropError("the checkpoint does not match its config.json:\n  " +
                           "\n  ".join(problems[:_MAX_LISTED]) + more)
    return plan


# ---------------------------------------------------------------------------- loading


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stack, layer, i):
    return jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0)


def _zeros(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def _without_leading_axis(sharding):
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return sharding


def _shardings(cfg: ModelConfig, mesh) -> dict:
    """Flat path -> sharding for every parameter of `cfg` (its own scan layout)."""
    if mesh is None:
        shapes = abstract_params(cfg)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return {p: device for p in _flat(shapes)}
    from llm_jax.parallel.rules import param_shardings

    return _flat(param_shardings(cfg, mesh))


class _Assembler:
    """Puts transformed tensors into their shardings, building the scanned stacks in place."""

    def __init__(self, cfg: ModelConfig, mesh):
        self.cfg, self.shardings, self.out = cfg, _shardings(cfg, mesh), {}
        self.dtype = NP_DTYPES[cfg.param_dtype]

    def put(self, path: str, layer: int | None, x: np.ndarray) -> None:
        x = x.astype(self.dtype, copy=False)
        if layer is None or not self.cfg.scan_layers:
            key = path if layer is None else f"layers_{layer}/{path}"
            self.out[key] = jax.device_put(x, self.shardings[key])
            return
        key, sharding = f"layers/{path}", self.shardings[f"layers/{path}"]
        if key not in self.out:
            self.out[key] = _zeros((self.cfg.n_layers,) + x.shape, x.dtype, sharding)
        self.out[key] = _set_layer(self.out[key], jax.device_put(x, _without_leading_axis(sharding)), layer)

    def params(self) -> dict:
        return _nest(self.out)


def load_weights(plan: dict[str, Target], stored: dict[str, Stored], cfg: ModelConfig, mesh=None) -> dict:
    """Stream the planned tensors, file by file, into a params tree."""
    assembler = _Assembler(cfg, mesh)
    host = jax.local_devices(backend="cpu")[0]  # read onto the host, never whole onto an accelerator
    for file in dict.fromkeys(s.file for s in stored.values()):
        with jax.default_device(host), safe_open(file, framework="flax") as f:
            for name in f.keys():
                target = plan.get(name)
                if target is None:
                    continue  # an ignored buffer
                x = np.asarray(f.get_tensor(name))
                for path, part in zip(target.rule.paths, target.rule.transform.to_ours(x, list(target.shapes))):
                    assembler.put(path, target.layer, part)
    return assembler.params()


# ---------------------------------------------------------------------------- writing


def check_params(params, cfg: ModelConfig) -> None:
    """The params tree must be exactly the one `cfg` builds (either scan layout)."""
    scanned = "layers" in params
    want = _flat(abstract_params(dataclasses.replace(cfg, scan_layers=scanned)))
    have = _flat(params)
    problems = [f"{p}: missing" for p in want.keys() - have.keys()]
    problems += [f"{p}: not a parameter of this config" for p in have.keys() - want.keys()]
    problems += [f"{p}: shape {tuple(have[p].shape)}, config implies {tuple(want[p].shape)}"
                 for p in want.keys() & have.keys() if tuple(have[p].shape) != tuple(want[p].shape)]
    if problems:
        raise InteropError("the parameters do not match the model config: " + "; ".join(sorted(problems)[:_MAX_LISTED]))


def _fetch(flat: dict, target: Target, scanned: bool) -> list[np.ndarray]:
    """Our arrays for one stored tensor, fetched to the host (one layer's slice of a stack)."""
    out = []
    for path in target.rule.paths:
        if target.layer is None:
            x = flat[path]
        elif scanned:
            x = flat[f"layers/{path}"][target.layer]
        else:
            x = flat[f"layers_{target.layer}/{path}"]
        out.append(np.asarray(jax.device_get(x)))
    return out


def _shard_plan(expected: dict[str, Target], itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name, target in expected.items():
        nbytes = math.prod(target.hf_shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_weights(params, cfg: ModelConfig, family: Family, out_dir: pathlib.Path, *, dtype: str,
                 max_shard_bytes: int) -> list[pathlib.Path]:
    """Write the params as `family`'s safetensors (sharded past `max_shard_bytes`)."""
    check_params(params, cfg)
    flat, scanned = _flat(params), "layers" in params
    expected = expected_tensors(family, cfg)
    np_dtype = NP_DTYPES[dtype]
    shards = _shard_plan(expected, np_dtype.itemsize, max_shard_bytes)
    files = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for file, names in zip(files, shards):
        tensors = {}
        for name in names:
            target = expected[name]
            x = target.rule.transform.to_hf(_fetch(flat, target, scanned))
            tensors[name] = np.ascontiguousarray(x.astype(np_dtype, copy=False))
        save_file(tensors, out_dir / file, metadata={"format": "pt"})  # transformers checks "pt"
        del tensors
    if len(files) > 1:
        total = sum(math.prod(t.hf_shape) for t in expected.values()) * np_dtype.itemsize
        weight_map = {name: file for file, names in zip(files, shards) for name in names}
        (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
    return [out_dir / f for f in files]
