"""Typed, frozen experiment configuration.

An experiment is one `ExperimentConfig`: a model, a mesh, an optimizer, data, a training
schedule and decoding defaults. Every field is validated when the dataclass is built, so
a bad value fails here, naming the field, before anything is traced or compiled.

Configs change only through `override` (dotted `key=value` strings from the command line)
or `dataclasses.replace`, and round-trip through JSON (`to_json` / `from_json`), which is
how checkpoints record the configuration that produced them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Literal, Optional, Sequence, get_args, get_origin

# The choices below are the single source of truth: validation and the override parser
# both read them from the type annotations.
MaskKind = Literal["causal", "prefix", "bidirectional"]
PositionKind = Literal["learned", "sinusoidal", "rope", "alibi", "relative", "none"]
RopeScaling = Literal["none", "linear", "llama3"]
NormKind = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "gelu_exact", "relu", "silu", "swiglu", "geglu"]
RematPolicy = Literal["none", "full", "save_dots", "save_dots_no_batch", "save_attention_mlp_out",
                      "offload_attention_mlp_out"]
AttentionImpl = Literal["einsum", "dot_product"]
ComputeDtype = Literal["auto", "float32", "bfloat16"]
ParamDtype = Literal["float32", "bfloat16"]


class ConfigError(ValueError):
    """A configuration value or override is invalid; the message names the field."""


# How each section is spelled in dotted keys, so errors name fields as users type them.
_SECTIONS = {
    "ModelConfig": "model",
    "PeftConfig": "model.peft",
    "MeshConfig": "mesh",
    "OptimConfig": "optim",
    "DataConfig": "data",
    "TrainConfig": "train",
    "DecodeConfig": "decode",
    "SFTConfig": "sft",
}


def _check_literals(obj: Any) -> None:
    """Reject any Literal-typed field whose value is not one of its choices."""
    hints = typing.get_type_hints(type(obj))
    section = _SECTIONS.get(type(obj).__name__, type(obj).__name__)
    for f in dataclasses.fields(obj):
        choices = _literal_choices(hints[f.name])
        value = getattr(obj, f.name)
        if choices is not None and value not in choices and value is not None:
            raise ConfigError(
                f"{section}.{f.name}={value!r} is not allowed; "
                f"choose one of {', '.join(map(repr, choices))}"
            )


def _literal_choices(tp: Any) -> tuple | None:
    if get_origin(tp) is Literal:
        return get_args(tp)
    if _is_optional(tp):
        return _literal_choices(_strip_optional(tp))
    return None


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp)


def _strip_optional(tp: Any) -> Any:
    args = [a for a in get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 else typing.Union[tuple(args)]


def _require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field}: {message}")


PeftMethod = Literal["none", "lora", "qlora", "prefix", "ptuning_v2", "prompt", "ptuning", "adapter"]


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Parameter-efficient tuning (`llm_jax.models.peft`); `method="none"` leaves the model as it is.

    lora / qlora:       low-rank updates of the projections named in `lora_targets`
                        (qlora: on a frozen NF4 base with one scale per `qlora_group_size`)
    prefix, ptuning_v2: `n_virtual` trained keys/values per layer (prefix: through an MLP)
    prompt, ptuning:    `n_virtual` trained input embeddings (ptuning: through an MLP)
    adapter:            bottlenecks of width `adapter_dim` after attention and after the MLP
    """

    method: PeftMethod = "none"
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    # Comma-separated projection names (query, key, value, out, wi, wi_gate, wi_up, wo,
    # unembed) or "all"; the attention queries and values, as in the LoRA paper.
    lora_targets: str = "query,value"
    qlora_group_size: int = 64
    n_virtual: int = 16
    # Hidden width of prefix tuning's and P-tuning's reparameterisation MLP.
    encoder_hidden: int = 64
    adapter_dim: int = 16

    def __post_init__(self):
        _check_literals(self)
        for name in ("lora_rank", "qlora_group_size", "n_virtual", "encoder_hidden", "adapter_dim"):
            _require(getattr(self, name) > 0, f"model.peft.{name}", f"must be positive, got {getattr(self, name)}")
        _require(self.lora_alpha > 0, "model.peft.lora_alpha", f"must be positive, got {self.lora_alpha}")
        _require(0.0 <= self.lora_dropout < 1.0, "model.peft.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        _require(bool(self.target_names), "model.peft.lora_targets", "names no projection")

    @property
    def target_names(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "qlora")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that decides the model's parameters and its forward pass."""

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    # None means multi-head attention (n_kv_heads == n_heads); 1 is multi-query.
    n_kv_heads: Optional[int] = None
    d_ff: int = 256
    max_seq_len: int = 128

    mask: MaskKind = "causal"
    position: PositionKind = "rope"
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling = "none"
    rope_scaling_factor: float = 1.0
    # Llama-3 style frequency-dependent scaling; ignored by the other scalings.
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    # T5 relative position buckets (position="relative").
    relative_buckets: int = 32
    relative_max_distance: int = 128
    # Attend only to the last `sliding_window` keys (Mistral); None attends to all.
    sliding_window: Optional[int] = None

    norm: NormKind = "rmsnorm"
    norm_eps: float = 1e-5
    activation: Activation = "swiglu"
    # PaLM / GPT-J: attention and MLP read the same normed input and are summed.
    parallel_block: bool = False
    tie_embeddings: bool = True
    use_bias: bool = False
    # Qwen2 puts biases on the q/k/v projections only; None follows use_bias.
    qkv_bias: Optional[bool] = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02

    scan_layers: bool = True
    remat: RematPolicy = "none"
    attention: AttentionImpl = "einsum"
    dtype: ComputeDtype = "auto"
    param_dtype: ParamDtype = "float32"
    peft: PeftConfig = PeftConfig()

    def __post_init__(self):
        _check_literals(self)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            _require(getattr(self, name) > 0, f"model.{name}", f"must be positive, got {getattr(self, name)}")
        _require(math.isfinite(self.init_std) and self.init_std > 0, "model.init_std",
                 f"must be a positive number, got {self.init_std}")
        _require(
            self.d_model % self.n_heads == 0,
            "model.n_heads",
            f"n_heads={self.n_heads} must divide d_model={self.d_model} "
            f"(divisors of d_model up to 128: {_divisors(self.d_model)})",
        )
        _require(
            self.n_kv_heads is None or (self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0),
            "model.n_kv_heads",
            f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads} "
            f"(allowed: {_divisors(self.n_heads)})",
        )
        for name in ("dropout", "attention_dropout"):
            v = getattr(self, name)
            _require(0.0 <= v < 1.0, f"model.{name}", f"must be in [0, 1), got {v}")
        _require(
            not (self.attention == "dot_product" and self.attention_dropout > 0),
            "model.attention_dropout",
            "jax.nn.dot_product_attention has no attention dropout; use attention='einsum'",
        )
        _require(self.rope_scaling_factor >= 1.0, "model.rope_scaling_factor", "must be >= 1")
        _require(
            self.sliding_window is None or self.sliding_window > 0,
            "model.sliding_window",
            f"must be positive or None, got {self.sliding_window}",
        )
        _require(self.sliding_window is None or self.mask == "causal", "model.sliding_window",
                 f"is a causal window (the last sliding_window keys); model.mask={self.mask!r} would see every "
                 f"later key however far: use mask='causal' or sliding_window=None")
        _require(self.position != "rope" or self.head_dim % 2 == 0, "model.n_heads",
                 f"RoPE rotates pairs of dimensions, so head_dim = d_model / n_heads must be even; d_model="
                 f"{self.d_model} / n_heads={self.n_heads} gives {self.head_dim}")
        # T5 bucketing: half the buckets (per direction) are exact offsets, the rest log-spaced
        # up to relative_max_distance, which must therefore lie beyond the exact range.
        _require(self.relative_buckets >= 4, "model.relative_buckets", f"must be >= 4, got {self.relative_buckets}")
        _require(
            self.relative_max_distance > self.relative_buckets // 2,
            "model.relative_max_distance",
            f"must exceed relative_buckets // 2 = {self.relative_buckets // 2}, got {self.relative_max_distance}",
        )
        _require(self.norm_eps > 0, "model.norm_eps", "must be positive")
        if self.peft.uses_lora:
            unknown = [t for t in self.peft.target_names if t not in self.projections + ("all",)]
            _require(not unknown, "model.peft.lora_targets",
                     f"{', '.join(map(repr, unknown))} names no module of this model; its projections are "
                     f"{', '.join(self.projections)} (or 'all')")

    @property
    def projections(self) -> tuple[str, ...]:
        """The names of this model's projection (Dense) modules, which LoRA can target."""
        mlp = ("wi_gate", "wi_up") if self.gated else ("wi",)
        return ("query", "key", "value", "out") + mlp + ("wo",) + (() if self.tie_embeddings else ("unembed",))

    def lora_targets(self) -> tuple[str, ...]:
        """The projections LoRA adapts (empty unless model.peft.method is lora or qlora)."""
        if not self.peft.uses_lora:
            return ()
        names = self.peft.target_names
        return self.projections if "all" in names else names

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 128) + 1) if n % d == 0]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; one of them may be -1, meaning "all remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    pipeline: int = 1
    # True: parameters, gradients and optimizer state are split over `fsdp` (ZeRO-3 / FSDP).
    # False: ZeRO-1, only the optimizer state is split; parameters stay whole on every
    # fsdp device (more memory, no all-gather of the weights in the forward pass).
    shard_params: bool = True
    # True: the optimizer state lives in pinned host memory between steps and visits the
    # device only for the update (needs a backend with a `pinned_host` memory kind).
    offload_optimizer: bool = False
    # With pipeline > 1: "gpipe" runs each microbatch through the stages once; "circular"
    # cuts the stack into pipeline * pipeline_repeats chunks and loops microbatches
    # through the ring pipeline_repeats times, shrinking the bubble by that factor.
    pipeline_schedule: Literal["gpipe", "circular"] = "gpipe"
    pipeline_repeats: int = 2  # circular only
    pipeline_microbatches: int = 0  # 0: 2 x pipeline (more shrinks the bubble)

    def axis_sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor, "pipeline": self.pipeline}

    def __post_init__(self):
        sizes = self.axis_sizes()
        for name, v in sizes.items():
            _require(v == -1 or v > 0, f"mesh.{name}", f"must be positive or -1, got {v}")
        _require(
            list(sizes.values()).count(-1) <= 1,
            "mesh",
            f"at most one axis may be -1 (the rest), got {sizes}",
        )
        _check_literals(self)
        _require(self.pipeline_repeats >= 1, "mesh.pipeline_repeats", "must be >= 1")
        _require(self.pipeline_microbatches >= 0, "mesh.pipeline_microbatches", "must be >= 0 (0: 2 x pipeline)")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "adafactor", "lion"] = "adamw"
    lr: float = 3e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 100
    # optax's schedules: warmup rises from 0 (the first update has lr 0) to lr at step
    # warmup_steps, then the decay reaches lr * min_lr_ratio at step train.steps (the last
    # update, step train.steps - 1, runs just above it).
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: Optional[float] = 1.0

    def __post_init__(self):
        _check_literals(self)
        for name in ("lr", "min_lr_ratio", "b1", "b2", "eps", "weight_decay"):
            _require(math.isfinite(getattr(self, name)), f"optim.{name}", f"must be finite, got {getattr(self, name)}")
        _require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        _require(self.eps > 0, "optim.eps", f"must be positive, got {self.eps}")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        _require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1/b2", "must be in [0, 1)")
        _require(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", "must be positive or None")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "stdlib": the running interpreter's standard library source (always present, so the
    # main job needs no download); "text": a file or directory at `path`; "tfds": a catalog
    # dataset `tfds_name` already prepared in `data_dir`.
    source: Literal["stdlib", "text", "tfds"] = "stdlib"
    path: Optional[str] = None
    tfds_name: Optional[str] = None
    text_field: str = "text"
    # Where prepared corpora live (tfds array_record files); None: $LLM_JAX_DATA_DIR or
    # ~/.cache/llm_jax/datasets.
    data_dir: Optional[str] = None
    # "hash": a document's content hash picks its split (stable); "tail": the last
    # `validation_fraction` of the text is validation (nanoGPT's shakespeare_char split).
    split: Literal["hash", "tail"] = "hash"
    validation_fraction: float = 0.05
    # The tokenizer is trained on the corpus when the run starts, unless `tokenizer_path`
    # names a saved one; its vocabulary size is model.vocab_size.
    tokenizer: Literal["sentencepiece", "char"] = "sentencepiece"
    tokenizer_model: Literal["bpe", "unigram"] = "bpe"
    tokenizer_path: Optional[str] = None
    # Characters of training text the sentencepiece trainer sees: enough for a good
    # vocabulary, small enough to train in seconds.
    tokenizer_sample_chars: int = 5_000_000
    seq_len: int = 128

    def __post_init__(self):
        _check_literals(self)
        _require(self.seq_len > 0, "data.seq_len", f"must be positive, got {self.seq_len}")
        _require(0 < self.validation_fraction < 1, "data.validation_fraction", "must be in (0, 1)")
        _require(self.tokenizer_sample_chars > 0, "data.tokenizer_sample_chars", "must be positive")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    microbatches: int = 1
    eval_every: int = 200
    eval_steps: int = 20
    log_every: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    z_loss: float = 0.0
    # A run stops after this many consecutive steps with a non-finite loss or gradient.
    max_bad_steps: int = 20
    seed: int = 0
    run_dir: str = "runs/default"
    # At the end of a run: a completion of this prompt (with the `decode` settings).
    sample_prompt: str = "def fibonacci(n):\n"
    sample_tokens: int = 64
    # A run directory (a previous run, or a Hugging Face checkpoint converted with
    # `llm-jax convert`) whose newest parameters start this run, with a fresh optimizer;
    # its model config and tokenizer replace this experiment's.
    init_from: Optional[str] = None
    # Knowledge distillation: a run directory whose frozen model is the teacher. The loss
    # becomes distill_alpha * T^2 * KL(teacher_T || student_T) + (1 - distill_alpha) * CE
    # at T = distill_temperature (llm_jax.finetune.distill); the student takes the
    # teacher's tokenizer and must have its vocab_size. Validation stays the student's CE.
    distill_from: Optional[str] = None
    distill_temperature: float = 2.0
    distill_alpha: float = 0.5
    tensorboard: bool = True
    wandb: bool = False  # only if wandb is installed
    progress_bar: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "microbatches", "eval_every", "log_every",
                     "checkpoint_every", "keep_checkpoints", "max_bad_steps"):
            _require(getattr(self, name) > 0, f"train.{name}", f"must be positive, got {getattr(self, name)}")
        _require(
            self.batch_size % self.microbatches == 0,
            "train.microbatches",
            f"microbatches={self.microbatches} must divide batch_size={self.batch_size}",
        )
        _require(math.isfinite(self.z_loss) and self.z_loss >= 0, "train.z_loss", f"must be finite and >= 0, got "
                 f"{self.z_loss}")
        _require(self.eval_steps >= 0, "train.eval_steps", "must be >= 0 (0 skips evaluation)")
        _require(self.sample_tokens >= 0, "train.sample_tokens", "must be >= 0 (0 skips the sample)")
        _require(self.distill_temperature > 0, "train.distill_temperature",
                 f"must be positive, got {self.distill_temperature}")
        _require(0 <= self.distill_alpha <= 1, "train.distill_alpha", f"must be in [0, 1], got {self.distill_alpha}")
        _require(self.distill_from is None or self.z_loss == 0, "train.z_loss",
                 "applies to the plain next-token loss; set it to 0 with train.distill_from")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    beam_size: int = 1
    seed: int = 0

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty"):
            _require(math.isfinite(getattr(self, name)), f"decode.{name}", f"must be finite, got {getattr(self, name)}")
        _require(self.max_new_tokens > 0, "decode.max_new_tokens", "must be positive")
        _require(self.temperature >= 0, "decode.temperature", f"must be >= 0, got {self.temperature}")
        _require(0 <= self.top_k < 2**31, "decode.top_k", f"must be in [0, 2**31) (0 disables it), got {self.top_k}")
        _require(0 < self.top_p <= 1, "decode.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(0 <= self.min_p < 1, "decode.min_p", f"must be in [0, 1), got {self.min_p}")
        _require(self.repetition_penalty > 0, "decode.repetition_penalty", "must be positive")
        _require(self.beam_size >= 1, "decode.beam_size", "must be >= 1")
        _require(-(2**63) <= self.seed < 2**63, "decode.seed", f"must fit in 64 signed bits, got {self.seed}")

    def sampling(self) -> dict:
        """The sampler settings, as `generate(..., sampling=...)` takes them."""
        names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty")
        return {name: getattr(self, name) for name in names}


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning data (`llm-jax finetune`, `llm_jax.finetune.data`)."""

    # JSONL files of {"instruction", "input", "output"} or {"messages": [...]} examples.
    train_path: Optional[str] = None
    # None: hold out the last `validation_fraction` of the training examples.
    validation_path: Optional[str] = None
    validation_fraction: float = 0.05
    # How a conversation becomes text: "default", "chatml" or "alpaca"
    # (llm_jax.finetune.data.TEMPLATES); stored with the run, so generation can use it.
    template: Literal["default", "chatml", "alpaca"] = "default"
    # False: the loss counts only the assistant's tokens; True: every token.
    train_on_prompt: bool = False

    def __post_init__(self):
        _check_literals(self)
        _require(0 <= self.validation_fraction < 1, "sft.validation_fraction", "must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: what `experiments/<name>.py:config()` returns."""

    name: str = "experiment"
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    decode: DecodeConfig = DecodeConfig()
    sft: SFTConfig = SFTConfig()

    def __post_init__(self):
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            f"seq_len={self.data.seq_len} exceeds the model's context model.max_seq_len={self.model.max_seq_len}",
        )


# --------------------------------------------------------------------------- overrides


def override(config: Any, assignments: Sequence[str]) -> Any:
    """Apply dotted `key=value` assignments (e.g. `model.n_layers=8`) to a frozen config.

    All assignments are taken in before any section is rebuilt, and each section is rebuilt
    once, so checks across fields see every new value together (`data.seq_len=256
    model.max_seq_len=256` passes in either order). A key given twice keeps its last value.
    """
    tree: dict = {}
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"override {assignment!r} must look like key=value, e.g. model.n_layers=8")
        key, raw = (part.strip() for part in assignment.split("=", 1))
        node, path = tree, key.split(".")
        for i, name in enumerate(path[:-1]):
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {key!r}: {'.'.join(path[: i + 1])!r} was also given a value")
        if isinstance(node.get(path[-1]), dict):
            raise ConfigError(f"config key {key!r} is a section, and some of its fields are also given")
        node[path[-1]] = (raw, key)
    return _apply(config, tree)


def _apply(obj: Any, tree: dict) -> Any:
    """`obj` with the assignments of `tree` (name -> (raw, full key) or a subtree), rebuilt once."""
    names = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for head, node in tree.items():
        some_key = node[1] if isinstance(node, tuple) else _first_key(node)
        if head not in names:
            raise ConfigError(
                f"unknown config key {some_key!r}: {type(obj).__name__} has no field {head!r}; "
                f"valid keys here: {', '.join(names)}"
            )
        current = getattr(obj, head)
        if isinstance(node, dict):
            if not dataclasses.is_dataclass(current):
                raise ConfigError(f"config key {some_key!r}: {head!r} is a value, not a section")
            changes[head] = _apply(current, node)
        else:
            if dataclasses.is_dataclass(current):
                sub = ", ".join(f"{head}.{f.name}" for f in dataclasses.fields(current))
                raise ConfigError(f"config key {some_key!r} is a section; set one of its fields: {sub}")
            changes[head] = _parse(node[0], typing.get_type_hints(type(obj))[head], node[1])
    return dataclasses.replace(obj, **changes) if changes else obj


def _first_key(tree: dict) -> str:
    node = next(iter(tree.values()))
    return node[1] if isinstance(node, tuple) else _first_key(node)


def _parse(raw: str, tp: Any, key: str) -> Any:
    if _is_optional(tp):
        if raw.lower() in ("none", "null"):
            return None
        return _parse(raw, _strip_optional(tp), key)
    choices = _literal_choices(tp)
    if choices is not None:
        if raw not in choices:
            raise ConfigError(f"{key}={raw!r} is not allowed; choose one of {', '.join(map(repr, choices))}")
        return raw
    if tp is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key} expects a bool (true/false), got {raw!r}")
    if tp in (int, float):
        try:
            value = tp(raw) if tp is float else int(raw)
        except ValueError:
            raise ConfigError(f"{key} expects {tp.__name__}, got {raw!r}") from None
        if tp is float and not math.isfinite(value):
            raise ConfigError(f"{key} expects a finite number, got {raw!r}")
        return value
    if tp is str:
        return raw
    raise ConfigError(f"{key}: overriding a field of type {tp} from the command line is not supported")


# ------------------------------------------------------------------------------- JSON


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def to_json(config: Any) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config dataclass from `to_dict` output, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} expects a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {sorted(unknown)}; valid keys: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value)
        else:
            kwargs[name] = _check_json_value(value, tp, f"{cls.__name__}.{name}")
    return cls(**kwargs)


def _check_json_value(value: Any, tp: Any, key: str) -> Any:
    if _is_optional(tp):
        return None if value is None else _check_json_value(value, _strip_optional(tp), key)
    if _literal_choices(tp) is not None or tp is str:
        ok = isinstance(value, str)
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{key} expects {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def from_json(text: str) -> ExperimentConfig:
    return from_dict(ExperimentConfig, json.loads(text))
