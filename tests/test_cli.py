"""The `llm-jax` command: its subcommands run and bad configs exit 2 with a message."""


from llm_jax import cli
from llm_jax.config import from_json
from llm_jax.models import count_params
from llm_jax import experiment


def test_forward_runs_the_debug_model(capsys):
    assert cli.main(["forward", "model.n_layers=1", "--length", "16"]) == 0
    out = capsys.readouterr().out
    assert "logits (2, 16, 256) float32" in out and "loss" in out


def test_params_total_equals_count_params(capsys):
    assert cli.main(["params", "--experiment", "gpt2_124m"]) == 0
    total = capsys.readouterr().out.strip().splitlines()[-1].split()[-1]
    assert int(total.replace(",", "")) == count_params(experiment.load("gpt2_124m").model) == 124_439_808


def test_config_prints_json_that_round_trips(capsys):
    assert cli.main(["config", "model.position=alibi"]) == 0
    cfg = from_json(capsys.readouterr().out)
    assert cfg.model.position == "alibi" and cfg == experiment.load("debug", ["model.position=alibi"])


def test_bad_override_exits_2_naming_the_key(capsys):
    assert cli.main(["forward", "model.n_heads=3"]) == 2
    err = capsys.readouterr().err
    assert "n_heads" in err and "d_model" in err


def test_experiments_lists_the_presets(capsys):
    assert cli.main(["experiments"]) == 0
    out = capsys.readouterr().out
    assert "llama3_8b" in out and "debug" in out
