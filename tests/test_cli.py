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


def test_train_then_generate_from_the_checkpoint(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat.\n" * 400)
    run_dir = tmp_path / "run"
    args = ["train", "--experiment", "debug", "data.source=text", f"data.path={corpus}", "data.split=tail",
            "data.tokenizer=char", f"data.data_dir={tmp_path / 'data'}", "data.seq_len=32", "train.steps=4",
            "train.batch_size=8", "train.eval_every=2", "train.eval_steps=1", "train.log_every=2",
            "train.checkpoint_every=2", f"train.run_dir={run_dir}", "train.progress_bar=false",
            "train.sample_tokens=0", "train.tensorboard=false", "optim.warmup_steps=1"]
    assert cli.main(args) == 0
    assert "validation loss" in capsys.readouterr().out
    assert cli.main(["generate", "--checkpoint", str(run_dir), "--prompt", "the cat", "max_new_tokens=5",
                     "temperature=0"]) == 0
    captured = capsys.readouterr()
    line = captured.out.splitlines()[0]
    assert line.startswith("the cat") and len(line) == len("the cat") + 5  # streamed, one char per token
    assert "step 4" in captured.err
    assert cli.main(["evaluate", "--checkpoint", str(run_dir), "--batches", "2", "--quantize", "int8", "int4",
                     "--group-size", "32"]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = {line.split(" (")[0].split()[0]: line.split() for line in table[2:]}
    assert set(rows) == {"float32", "int8", "int4"}
    float_ppl, int8_ppl = float(rows["float32"][3]), float(rows["int8"][-3])
    assert abs(int8_ppl / float_ppl - 1) < 0.01  # int8 weights barely move perplexity


def test_train_and_generate_report_bad_input(tmp_path, capsys):
    assert cli.main(["train", "--experiment", "debug", "data.source=text"]) == 2
    assert "data.path" in capsys.readouterr().err
    assert cli.main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "no checkpoints/ folder" in capsys.readouterr().err
