"""Every experiment file builds; presets have the published parameter counts at full size."""

import jax
import pytest

from llm_jax import experiment
from llm_jax.config import ExperimentConfig, from_json, to_json
from llm_jax.models import count_params, param_shapes

EXPERIMENTS = sorted(experiment.available())

# The presets the project promises, each with a published parameter count.
PRESETS_WITH_PUBLISHED_COUNTS = {
    "gpt2_124m", "gpt2_350m", "gpt2_774m", "gpt2_1_5b",
    "llama2_7b", "llama3_8b", "llama3_70b", "mistral_7b",
}


def test_the_promised_experiments_exist():
    assert PRESETS_WITH_PUBLISHED_COUNTS | {"debug", "palm_prefix_lm"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_builds_and_traces_at_full_size(name):
    cfg = experiment.load(name)
    assert isinstance(cfg, ExperimentConfig)
    assert from_json(to_json(cfg)) == cfg
    # eval_shape traces init at full size without allocating a single parameter.
    shapes = param_shapes(cfg.model)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes, is_leaf=lambda x: hasattr(x, "shape")))
    assert count_params(cfg.model) > 0


@pytest.mark.parametrize("name", sorted(PRESETS_WITH_PUBLISHED_COUNTS))
def test_preset_parameter_count_matches_the_published_one(name):
    module = experiment.load_module(name)
    published = module.PUBLISHED_PARAMS
    ours = count_params(module.config().model)
    assert abs(ours - published) / published < 0.005, (ours, published)


def test_unknown_experiment_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        experiment.load("gpt5")
    assert "gpt5" in str(e.value) and "debug" in str(e.value)


def test_experiment_from_a_file_path(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(
        "from llm_jax.config import ExperimentConfig, ModelConfig\n"
        "def config():\n    return ExperimentConfig(name='mine', model=ModelConfig(n_layers=1))\n"
    )
    cfg = experiment.load(str(path), ["model.d_model=32"])
    assert cfg.name == "mine" and cfg.model.n_layers == 1 and cfg.model.d_model == 32
