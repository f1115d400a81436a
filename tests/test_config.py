"""Configs: validation at construction, dotted overrides, JSON round trips."""

import dataclasses

import pytest

from llm_jax.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    DecodeConfig,
    from_json,
    override,
    to_json,
)


def test_override_sets_nested_fields_with_their_types():
    cfg = override(
        ExperimentConfig(),
        ["model.n_layers=8", "optim.lr=3e-4", "model.tie_embeddings=false", "model.n_kv_heads=2",
         "model.sliding_window=none", "model.position=alibi", "name=run1"],
    )
    assert cfg.model.n_layers == 8 and isinstance(cfg.model.n_layers, int)
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.tie_embeddings is False
    assert cfg.model.n_kv_heads == 2
    assert cfg.model.sliding_window is None
    assert cfg.model.position == "alibi"
    assert cfg.name == "run1"


def test_override_leaves_the_original_untouched():
    base = ExperimentConfig()
    override(base, ["model.n_layers=8"])
    assert base.model.n_layers == ModelConfig().n_layers


def test_unknown_key_names_the_key_and_the_valid_choices():
    with pytest.raises(ConfigError) as e:
        override(ExperimentConfig(), ["model.nlayers=8"])
    msg = str(e.value)
    assert "model.nlayers" in msg and "n_layers" in msg and "d_model" in msg

    with pytest.raises(ConfigError) as e:
        override(ExperimentConfig(), ["optimizer.lr=1"])
    assert "optimizer" in str(e.value) and "optim" in str(e.value)


@pytest.mark.parametrize(
    "assignment, words",
    [
        ("model.n_layers=eight", ["model.n_layers", "int", "eight"]),
        ("optim.lr=fast", ["optim.lr", "float"]),
        ("model.use_bias=maybe", ["model.use_bias", "bool"]),
        ("model.norm=batchnorm", ["model.norm", "'rmsnorm'", "'layernorm'"]),
        ("model=3", ["section", "model.n_layers"]),
        ("model.n_layers.x=3", ["model.n_layers.x", "not a section"]),
        ("model.n_layers", ["key=value"]),
        ("optim.weight_decay=nan", ["optim.weight_decay", "finite"]),
        ("optim.lr=inf", ["optim.lr", "finite"]),
        ("optim.eps=-1", ["optim.eps", "positive"]),
        ("model.init_std=0", ["model.init_std", "positive"]),
    ],
)
def test_bad_override_errors_say_what_is_wrong(assignment, words):
    with pytest.raises(ConfigError) as e:
        override(ExperimentConfig(), [assignment])
    for word in words:
        assert word in str(e.value)


def test_overrides_are_checked_together_whatever_their_order():
    base = override(ExperimentConfig(), ["model.max_seq_len=128", "data.seq_len=128"])
    for pair in (["data.seq_len=256", "model.max_seq_len=256"], ["model.max_seq_len=256", "data.seq_len=256"]):
        cfg = override(base, pair)
        assert cfg.data.seq_len == cfg.model.max_seq_len == 256
    for pair in (["train.microbatches=3", "train.batch_size=6"], ["train.batch_size=6", "train.microbatches=3"]):
        assert override(ExperimentConfig(), pair).train.microbatches == 3
    assert override(ExperimentConfig(), ["model.n_layers=3", "model.n_layers=5"]).model.n_layers == 5  # last wins
    with pytest.raises(ConfigError, match="seq_len=512 exceeds the model.s context model.max_seq_len=128"):
        override(base, ["data.seq_len=512", "model.n_layers=3"])


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        (dict(d_model=64, n_heads=5), "n_heads", "[1, 2, 4, 8, 16, 32, 64]"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads", "[1, 2, 4]"),
        (dict(position="absolute"), "position", "'rope'"),
        (dict(norm="batchnorm"), "norm", "'rmsnorm'"),
        (dict(activation="tanh"), "activation", "'swiglu'"),
        (dict(mask="sparse"), "mask", "'prefix'"),
        (dict(remat="some"), "remat", "'save_dots'"),
        (dict(attention="flash"), "attention", "'dot_product'"),
        (dict(dropout=1.5), "dropout", "[0, 1)"),
        (dict(attention="dot_product", attention_dropout=0.1), "attention_dropout", "einsum"),
        (dict(relative_buckets=3), "relative_buckets", ">= 4"),
        (dict(relative_buckets=32, relative_max_distance=16), "relative_max_distance", "relative_buckets // 2"),
        (dict(mask="bidirectional", sliding_window=4), "sliding_window", "mask='causal'"),
        (dict(d_model=36, n_heads=4), "n_heads", "must be even"),
    ],
)
def test_model_config_rejects_bad_values_at_construction(kwargs, field, allowed):
    with pytest.raises(ValueError) as e:
        ModelConfig(**kwargs)
    assert field in str(e.value) and allowed in str(e.value)


def test_other_sections_validate_too():
    with pytest.raises(ValueError, match="mesh"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="optim.name"):
        OptimConfig(name="sgd")
    with pytest.raises(ValueError, match="microbatches"):
        TrainConfig(batch_size=10, microbatches=3)
    with pytest.raises(ValueError, match="top_p"):
        DecodeConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        DecodeConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="data.seq_len"):
        ExperimentConfig(model=ModelConfig(max_seq_len=64), data=DataConfig(seq_len=128))


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().n_layers = 3


def test_json_round_trip_is_exact():
    cfg = override(ExperimentConfig(), ["model.n_kv_heads=2", "optim.grad_clip=none", "model.rope_theta=5e5"])
    assert from_json(to_json(cfg)) == cfg


def test_json_rejects_unknown_keys_and_wrong_types():
    import json

    data = json.loads(to_json(ExperimentConfig()))
    data["model"]["n_layer"] = 3
    with pytest.raises(ConfigError, match="n_layer"):
        from_json(json.dumps(data))

    data = json.loads(to_json(ExperimentConfig()))
    data["model"]["n_layers"] = "3"
    with pytest.raises(ConfigError, match="n_layers"):
        from_json(json.dumps(data))
