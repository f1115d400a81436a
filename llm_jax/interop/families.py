"""The Hugging Face model families we read and write, as data: one `Family` table each.

A table says how a checkpoint's `config.json` keys become `ModelConfig` fields (`Key`)
and how each stored tensor becomes one or more of our parameters (`Rule`, with a
`Transform`). The converter in `checkpoint.py` and `hf_config.py` only walks these
tables, so a new family that fits the model is a new table, not new code.

Tensor names use `{i}` for the layer index; our paths are `/`-separated keys of the
params tree, relative to one layer for the per-layer rules (they land in the scanned
`layers` stack at index i, or in `layers_{i}` when `scan_layers=False`). A rule applies
when every path it names exists for the config (e.g. `attention/query/bias` only with
qkv biases, `unembed/kernel` only when embeddings are untied), so one table covers the
optional tensors of a family.

RoPE needs no permutation: Hugging Face's Llama layout rotates the pairs (i, i + H/2)
("rotate half"), which is what `llm_jax.models.positions.apply_rope` does; only Meta's
original (interleaved) checkpoints would need one, and those are not read here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

REQUIRED = object()  # a Key with no default: config.json must have it


# ----------------------------------------------------------------------------- transforms


class Transform:
    """How one stored tensor maps onto our parameter(s); `shapes` are ours, one per path."""

    def hf_shape(self, shapes: list[tuple]) -> tuple: ...

    def to_ours(self, x: np.ndarray, shapes: list[tuple]) -> list[np.ndarray]: ...

    def to_hf(self, xs: list[np.ndarray]) -> np.ndarray: ...


class _Single(Transform):
    """A transform between one stored tensor and one parameter."""

    def hf_shape(self, shapes):
        return self.hf_shape_of(shapes[0])

    def to_ours(self, x, shapes):
        return [self.one_to_ours(x, shapes[0])]

    def to_hf(self, xs):
        return self.one_to_hf(xs[0])


@dataclasses.dataclass(frozen=True)
class Same(_Single):
    """Stored exactly as we store it (embeddings, norm scales, unsplit biases)."""

    def hf_shape_of(self, shape):
        return tuple(shape)

    def one_to_ours(self, x, shape):
        return x

    def one_to_hf(self, x):
        return x


@dataclasses.dataclass(frozen=True)
class Flat(_Single):
    """A flat vector that we keep split over heads, e.g. a q/k/v bias [N*H] <-> [N, H]."""

    def hf_shape_of(self, shape):
        return (math.prod(shape),)

    def one_to_ours(self, x, shape):
        return x.reshape(shape)

    def one_to_hf(self, x):
        return x.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Linear(_Single):
    """torch.nn.Linear weight [out, in] <-> our kernel [*in, *out] (first `n_in` axes are inputs).

    A transpose, then a reshape that splits heads apart: q_proj [N*H, D] -> [D, N, H],
    o_proj [D, N*H] -> [N, H, D] (n_in=2), lm_head [V, D] -> [D, V].
    """

    n_in: int = 1

    def hf_shape_of(self, shape):
        return (math.prod(shape[self.n_in:]), math.prod(shape[: self.n_in]))

    def one_to_ours(self, x, shape):
        return np.ascontiguousarray(x.T).reshape(shape)

    def one_to_hf(self, x):
        n_in = math.prod(x.shape[: self.n_in])
        return np.ascontiguousarray(x.reshape(n_in, -1).T)


@dataclasses.dataclass(frozen=True)
class Conv1D(_Single):
    """GPT-2's Conv1D weight, already [in, out]: only the head split, no transpose."""

    n_in: int = 1

    def hf_shape_of(self, shape):
        return (math.prod(shape[: self.n_in]), math.prod(shape[self.n_in:]))

    def one_to_ours(self, x, shape):
        return x.reshape(shape)

    def one_to_hf(self, x):
        return x.reshape(math.prod(x.shape[: self.n_in]), -1)


@dataclasses.dataclass(frozen=True)
class Split(Transform):
    """A fused tensor (GPT-2's c_attn = [q | k | v]) cut along `axis`, each part by `part`."""

    axis: int
    part: _Single

    def hf_shape(self, shapes):
        parts = [self.part.hf_shape_of(s) for s in shapes]
        fused = list(parts[0])
        fused[self.axis] = sum(p[self.axis] for p in parts)
        return tuple(fused)

    def to_ours(self, x, shapes):
        sizes = [self.part.hf_shape_of(s)[self.axis] for s in shapes]
        pieces = np.split(x, np.cumsum(sizes)[:-1], axis=self.axis)
        return [self.part.one_to_ours(p, s) for p, s in zip(pieces, shapes)]

    def to_hf(self, xs):
        return np.concatenate([self.part.one_to_hf(x) for x in xs], axis=self.axis)


# ------------------------------------------------------------------------------- tables


@dataclasses.dataclass(frozen=True)
class Rule:
    """Stored tensor `hf` ({i}: layer index) <-> our parameter path(s) `ours`."""

    hf: str
    ours: str | tuple[str, ...]
    transform: Transform = Same()

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.ours,) if isinstance(self.ours, str) else self.ours

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


@dataclasses.dataclass(frozen=True)
class Key:
    """config.json key `hf` <-> ModelConfig field `field`.

    default: Hugging Face's default when the key is absent or null (a function of the
             whole config.json for derived defaults); REQUIRED if it must be present.
    values:  the accepted values and what each becomes; any other value is refused.
             With field=None the key changes nothing of ours and only has to hold an
             accepted value (a feature our model lacks must be switched off).
    why:     for refusals, what our model lacks.
    """

    hf: str
    field: str | None
    default: Any = REQUIRED
    values: Mapping[Any, Any] | None = None
    why: str = ""


@dataclasses.dataclass(frozen=True)
class Family:
    """One Hugging Face `model_type` and how its checkpoints map onto ours."""

    model_type: str
    architecture: str  # the causal-LM class; written on export, the only one accepted on import
    keys: tuple[Key, ...]
    fixed: Mapping[str, Any]  # ModelConfig fields every checkpoint of the family has
    tensors: tuple[Rule, ...]
    # Stored tensors that are not weights of ours: non-persistent buffers of old
    # checkpoints, and lm_head when config.json ties it to the embedding (as transformers
    # does, the embedding wins). A rule that applies is matched first.
    ignored: tuple[str, ...] = ()
    rope: bool = False  # rope_theta / rope_scaling (or v5's rope_parameters) apply
    sliding_window: bool = False  # the family has Mistral's sliding_window key
    # Qwen2: the window applies only with this flag, from layer `max_window_layers` on.
    sliding_window_switch: str | None = None
    # GPT-2 checkpoints saved from the bare GPT2Model lack the "transformer." prefix.
    optional_prefix: str = ""


# RoPE scaling: Hugging Face `rope_type` -> (our rope_scaling, {their key: our field}).
ROPE_TYPES: dict[str, tuple[str, dict[str, str]]] = {
    "default": ("none", {}),
    "linear": ("linear", {"factor": "rope_scaling_factor"}),
    "llama3": ("llama3", {
        "factor": "rope_scaling_factor",
        "low_freq_factor": "rope_low_freq_factor",
        "high_freq_factor": "rope_high_freq_factor",
        "original_max_position_embeddings": "rope_original_max_len",
    }),
}


def _kv_heads_default(hf: dict) -> int:
    return hf["num_attention_heads"]  # Llama 1/2 configs predate GQA


def _llama_keys(max_len_default: int) -> tuple[Key, ...]:
    """The config keys Llama, Mistral and Qwen2 share (their defaults differ only in context)."""
    return (
        Key("vocab_size", "vocab_size"),
        Key("hidden_size", "d_model"),
        Key("num_hidden_layers", "n_layers"),
        Key("num_attention_heads", "n_heads"),
        Key("num_key_value_heads", "n_kv_heads", default=_kv_heads_default),
        Key("intermediate_size", "d_ff"),
        Key("max_position_embeddings", "max_seq_len", default=max_len_default),
        Key("rms_norm_eps", "norm_eps", default=1e-6),
        Key("tie_word_embeddings", "tie_embeddings", default=False),
        Key("initializer_range", "init_std", default=0.02),
        Key("attention_dropout", "attention_dropout", default=0.0),
        Key("hidden_act", "activation", default="silu", values={"silu": "swiglu"},
            why="the gated MLP of this family is SwiGLU"),
        Key("partial_rotary_factor", None, default=1.0, values={1.0: None},
            why="RoPE rotates the whole head"),
    )


_LLAMA_FIXED = dict(position="rope", norm="rmsnorm", use_bias=False, qkv_bias=None, dropout=0.0)

_L = "model.layers.{i}."
LLAMA_TENSORS = (
    Rule("model.embed_tokens.weight", "embed/embedding"),
    Rule("model.norm.weight", "final_norm/scale"),
    Rule("lm_head.weight", "unembed/kernel", Linear()),
    Rule(_L + "input_layernorm.weight", "attention_norm/scale"),
    Rule(_L + "post_attention_layernorm.weight", "mlp_norm/scale"),
    Rule(_L + "self_attn.q_proj.weight", "attention/query/kernel", Linear()),
    Rule(_L + "self_attn.k_proj.weight", "attention/key/kernel", Linear()),
    Rule(_L + "self_attn.v_proj.weight", "attention/value/kernel", Linear()),
    Rule(_L + "self_attn.q_proj.bias", "attention/query/bias", Flat()),  # Qwen2
    Rule(_L + "self_attn.k_proj.bias", "attention/key/bias", Flat()),
    Rule(_L + "self_attn.v_proj.bias", "attention/value/bias", Flat()),
    Rule(_L + "self_attn.o_proj.weight", "attention/out/kernel", Linear(n_in=2)),
    Rule(_L + "mlp.gate_proj.weight", "mlp/wi_gate/kernel", Linear()),
    Rule(_L + "mlp.up_proj.weight", "mlp/wi_up/kernel", Linear()),
    Rule(_L + "mlp.down_proj.weight", "mlp/wo/kernel", Linear()),
)
_LLAMA_IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"lm_head\.weight")

LLAMA = Family(
    model_type="llama",
    architecture="LlamaForCausalLM",
    keys=_llama_keys(2048) + (
        Key("attention_bias", None, default=False, values={False: None},
            why="llm_jax has q/k/v biases (qkv_bias) but no output-projection bias without MLP biases"),
        Key("mlp_bias", None, default=False, values={False: None}, why="the Llama MLP has no biases here"),
    ),
    fixed=_LLAMA_FIXED,
    tensors=LLAMA_TENSORS,
    ignored=_LLAMA_IGNORED,
    rope=True,
)

MISTRAL = Family(
    model_type="mistral",
    architecture="MistralForCausalLM",
    keys=_llama_keys(131072),
    fixed=_LLAMA_FIXED,
    tensors=LLAMA_TENSORS,
    ignored=_LLAMA_IGNORED,
    rope=True,
    sliding_window=True,
)

QWEN2 = Family(
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    keys=_llama_keys(32768),
    fixed={**_LLAMA_FIXED, "qkv_bias": True},
    tensors=LLAMA_TENSORS,
    ignored=_LLAMA_IGNORED,
    rope=True,
    sliding_window=True,
    sliding_window_switch="use_sliding_window",
)


def _gpt2_d_ff_default(hf: dict) -> int:
    return 4 * hf["n_embd"]


_H = "transformer.h.{i}."
GPT2 = Family(
    model_type="gpt2",
    architecture="GPT2LMHeadModel",
    keys=(
        Key("vocab_size", "vocab_size"),
        Key("n_embd", "d_model"),
        Key("n_layer", "n_layers"),
        Key("n_head", "n_heads"),
        Key("n_inner", "d_ff", default=_gpt2_d_ff_default),
        Key("n_positions", "max_seq_len", default=1024),
        Key("layer_norm_epsilon", "norm_eps", default=1e-5),
        Key("tie_word_embeddings", "tie_embeddings", default=True),
        Key("initializer_range", "init_std", default=0.02),
        # embd_pdrop has no field of its own: our `dropout` also drops the embeddings.
        Key("resid_pdrop", "dropout", default=0.1),
        Key("attn_pdrop", "attention_dropout", default=0.1),
        Key("activation_function", "activation", default="gelu_new",
            values={"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact", "relu": "relu",
                    "silu": "silu"}),
        Key("scale_attn_weights", None, default=True, values={True: None},
            why="attention scores are always scaled by 1/sqrt(head_dim)"),
        Key("scale_attn_by_inverse_layer_idx", None, default=False, values={False: None},
            why="no per-layer attention scaling"),
        Key("add_cross_attention", None, default=False, values={False: None}, why="decoder-only model"),
    ),
    fixed=dict(position="learned", norm="layernorm", use_bias=True, qkv_bias=None, n_kv_heads=None),
    tensors=(
        Rule("transformer.wte.weight", "embed/embedding"),
        Rule("transformer.wpe.weight", "position_embed/embedding"),
        Rule("transformer.ln_f.weight", "final_norm/scale"),
        Rule("transformer.ln_f.bias", "final_norm/bias"),
        Rule("lm_head.weight", "unembed/kernel", Linear()),
        Rule(_H + "ln_1.weight", "attention_norm/scale"),
        Rule(_H + "ln_1.bias", "attention_norm/bias"),
        Rule(_H + "ln_2.weight", "mlp_norm/scale"),
        Rule(_H + "ln_2.bias", "mlp_norm/bias"),
        Rule(_H + "attn.c_attn.weight", ("attention/query/kernel", "attention/key/kernel", "attention/value/kernel"),
             Split(axis=1, part=Conv1D())),
        Rule(_H + "attn.c_attn.bias", ("attention/query/bias", "attention/key/bias", "attention/value/bias"),
             Split(axis=0, part=Flat())),
        Rule(_H + "attn.c_proj.weight", "attention/out/kernel", Conv1D(n_in=2)),
        Rule(_H + "attn.c_proj.bias", "attention/out/bias"),
        Rule(_H + "mlp.c_fc.weight", "mlp/wi/kernel", Conv1D()),
        Rule(_H + "mlp.c_fc.bias", "mlp/wi/bias"),
        Rule(_H + "mlp.c_proj.weight", "mlp/wo/kernel", Conv1D()),
        Rule(_H + "mlp.c_proj.bias", "mlp/wo/bias"),
    ),
    # attn.bias / attn.masked_bias: the causal-mask buffers older GPT-2 checkpoints stored.
    ignored=(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)", r"lm_head\.weight"),
    optional_prefix="transformer.",
)

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, MISTRAL, QWEN2, GPT2)}


def export_family(position: str, qkv_bias: bool, sliding_window: int | None) -> Family:
    """The family an llm_jax model is written as; `hf_config.to_hf_config` checks the fit."""
    if position == "learned":
        return GPT2
    if qkv_bias:
        return QWEN2
    return MISTRAL if sliding_window is not None else LLAMA

