"""The train loop end to end: metrics, evaluation, checkpoints, exact resume, bad input."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llm_jax import experiment
from llm_jax.config import ConfigError, override
from llm_jax.training.checkpoint import Checkpointer, load_trained_model
from llm_jax.training.loop import TrainingDiverged, train
from llm_jax.training.metrics import read_metrics
from text_runs import text_run_overrides

REPO = pathlib.Path(__file__).resolve().parents[1]


# Each test's run: 30 steps, evaluated and checkpointed every 10, with a sample at the end.
LOOP = {"train.steps": 30, "train.log_every": 1, "train.eval_every": 10, "train.eval_steps": 2,
        "train.checkpoint_every": 10, "train.sample_prompt": "anna gives", "train.sample_tokens": 8,
        "optim.warmup_steps": 5}


def _overrides(corpus_file, run_dir, **extra):
    # Each test prepares its own dataset: a run killed mid-way must not leave one for others.
    return text_run_overrides(corpus_file, run_dir, **{"data.data_dir": str(run_dir.parent / "datasets"), **LOOP,
                                                       **extra})


def _config(corpus_file, run_dir, **extra):
    return experiment.load("debug", _overrides(corpus_file, run_dir, **extra))


def _losses(run_dir):
    """Train loss by step; a resumed run re-logs steps after its checkpoint, the last entry wins."""
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def test_a_run_learns_evaluates_checkpoints_and_samples(corpus_file, tmp_path):
    run_dir = tmp_path / "run"
    lines = []
    result = train(_config(corpus_file, run_dir), print_fn=lines.append)
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 31))
    assert np.mean([losses[s] for s in range(26, 31)]) < 0.7 * np.mean([losses[s] for s in range(1, 4)])
    records = read_metrics(run_dir)
    validation = [r for r in records if "validation/loss" in r]
    assert [r["step"] for r in validation] == [10, 20, 30]
    assert validation[-1]["validation/loss"] < validation[0]["validation/loss"]
    v = result.validation
    np.testing.assert_allclose(v["perplexity"], np.exp(v["loss"]), rtol=1e-6)
    # Characters are one byte each here: bits per byte is the loss in bits (eos targets cost 0 bytes).
    assert 0.9 * v["loss"] / np.log(2) < v["bits_per_byte"] < 1.2 * v["loss"] / np.log(2)
    assert all(0 < r["train/mfu"] < 1 and r["train/tokens_per_second"] > 0 for r in records if "train/mfu" in r)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert Checkpointer(run_dir / "checkpoints").steps() == [10, 20, 30]
    assert result.sample.startswith("anna gives") and len(result.sample) > len("anna gives")
    assert any("validation loss" in line for line in lines)
    # The checkpoint serves generation: config and params come back from the run directory.
    cfg, params, step = load_trained_model(run_dir)
    assert step == 30 and cfg == _config(corpus_file, run_dir)


def test_restarting_a_finished_run_resumes_and_checks_the_config(corpus_file, tmp_path):
    run_dir = tmp_path / "run"
    train(_config(corpus_file, run_dir, **{"train.steps": 10, "train.sample_tokens": 0}), print_fn=lambda _: None)
    more = train(_config(corpus_file, run_dir, **{"train.steps": 20, "train.sample_tokens": 0}),
                 print_fn=lambda _: None)
    assert more.resumed_from == 10 and more.step == 20
    with pytest.raises(ConfigError, match="model.d_model: 64 -> 32"):
        train(_config(corpus_file, run_dir, **{"model.d_model": 32}), print_fn=lambda _: None)
    # Another optimizer state would not restore: refused, and the checkpoints stay as they are.
    with pytest.raises(ConfigError, match="optim.grad_clip: 1.0 -> None"):
        train(_config(corpus_file, run_dir, **{"optim.grad_clip": "None"}), print_fn=lambda _: None)
    assert Checkpointer(run_dir / "checkpoints").steps() == [10, 20]
    assert not list((run_dir / "checkpoints").glob("*.corrupt*"))


def _start(corpus_file, run_dir, steps):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    overrides = _overrides(corpus_file, run_dir, **{"train.steps": steps, "train.checkpoint_every": 5,
                                                    "train.sample_tokens": 0, "train.tensorboard": "false"})
    cmd = [sys.executable, "-m", "llm_jax.cli", "train", "--experiment", "debug", *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_and_resume_gives_exactly_the_uninterrupted_losses(corpus_file, tmp_path):
    steps = 40
    reference = tmp_path / "reference"
    train(_config(corpus_file, reference, **{"train.steps": steps, "train.checkpoint_every": 5,
                                             "train.sample_tokens": 0}), print_fn=lambda _: None)

    run_dir = tmp_path / "killed"
    proc = _start(corpus_file, run_dir, steps)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 17:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(run_dir))
    assert 10 <= killed_at < steps

    proc = _start(corpus_file, run_dir, steps)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "resumed from step" in output
    resumed_losses, reference_losses = _losses(run_dir), _losses(reference)
    assert sorted(resumed_losses) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert resumed_losses[step] == reference_losses[step], f"step {step}"


def test_an_unfinished_save_is_ignored_and_a_corrupt_checkpoint_falls_back(corpus_file, tmp_path):
    run_dir = tmp_path / "run"
    cfg = _config(corpus_file, run_dir, **{"train.steps": 20, "train.sample_tokens": 0})
    train(cfg, print_fn=lambda _: None)
    ckpt = run_dir / "checkpoints"
    # What a kill during a save leaves: a temporary directory that never got its final name.
    partial = ckpt / "25.orbax-checkpoint-tmp-1"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half_written").write_bytes(b"\0" * 10)
    # And a finished checkpoint whose files were damaged afterwards.
    for f in (ckpt / "20" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.warns(RuntimeWarning, match="20 could not be restored"):
        result = train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=30)),
                       print_fn=lambda _: None)
    assert result.resumed_from == 10
    assert (ckpt / "20.corrupt").is_dir() and not partial.exists()
    assert Checkpointer(ckpt).steps()[-1] == 30


def test_too_many_non_finite_steps_stop_the_run(corpus_file, tmp_path):
    # An absurd learning rate turns the weights to inf after the first update; every later
    # step is non-finite and skipped, and the run stops after max_bad_steps of them, here
    # steps 2-4, the last three (the last step's own count is checked too).
    cfg = _config(corpus_file, tmp_path / "run", **{"optim.lr": 1e30, "optim.grad_clip": "None",
                                                    "optim.warmup_steps": 0, "train.max_bad_steps": 3,
                                                    "train.steps": 4})
    with pytest.raises(TrainingDiverged, match="3 consecutive steps .up to step 4"):
        train(cfg, print_fn=lambda _: None)


def test_bad_run_settings_are_refused(corpus_file, tmp_path):
    # 8 simulated devices cannot split 6 rows evenly.
    with pytest.raises(ConfigError, match="batch_size=6"):
        train(_config(corpus_file, tmp_path / "a", **{"train.batch_size": 6}), print_fn=lambda _: None)
    with pytest.raises(ConfigError, match="data.path"):
        train(override(_config(corpus_file, tmp_path / "b"), ["data.path=None"]), print_fn=lambda _: None)
    with pytest.raises(ValueError, match="model.vocab_size"):
        train(_config(corpus_file, tmp_path / "c", **{"model.vocab_size": 8}), print_fn=lambda _: None)
    with pytest.raises(ConfigError, match="seq_len=64 exceeds"):
        _config(corpus_file, tmp_path / "d", **{"data.seq_len": 64, "model.max_seq_len": 32})


def test_metrics_file_is_json_lines(corpus_file, tmp_path):
    run_dir = tmp_path / "run"
    train(_config(corpus_file, run_dir, **{"train.steps": 3, "train.eval_steps": 1, "train.sample_tokens": 0, "optim.warmup_steps": 1}),
          print_fn=lambda _: None)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        assert isinstance(json.loads(line)["step"], int)


def test_init_from_starts_with_another_runs_weights_and_model(corpus_file, tmp_path):
    base_dir = tmp_path / "base"
    base = train(_config(corpus_file, base_dir, **{"train.steps": 30, "train.sample_tokens": 0}),
                 print_fn=lambda _: None)
    lines = []
    # A different model in the experiment: the base run's model and tokenizer win.
    cfg = _config(corpus_file, tmp_path / "tuned", **{"train.steps": 2, "train.sample_tokens": 0, "optim.warmup_steps": 1,
                                                       "model.d_model": 32, "train.init_from": str(base_dir)})
    tuned = train(cfg, print_fn=lines.append)
    assert any("using the model config of" in line for line in lines)
    assert any("starting from the parameters of" in line for line in lines)
    first = _losses(tmp_path / "tuned")[1]
    fresh_first = _losses(base_dir)[1]
    assert first < 0.8 * fresh_first  # it starts where the base run ended, not from scratch
    assert abs(first - base.train_loss) < 0.5
    assert tuned.step == 2
    with pytest.raises(FileNotFoundError, match="no checkpoints/ folder"):
        train(override(cfg, [f"train.init_from={tmp_path / 'nowhere'}", f"train.run_dir={tmp_path / 'x'}"]),
              print_fn=lambda _: None)


def test_checkpointer_keeps_the_newest_and_the_best(tmp_path):
    import grain
    import jax

    from llm_jax.config import ExperimentConfig
    from llm_jax.training import init_train_state

    cfg = ExperimentConfig()
    state = init_train_state(cfg.model, cfg.optim, 1000, jax.random.key(0))
    iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
    checkpointer = Checkpointer(tmp_path, keep=2)
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: None, 6: 6.0}
    for step, loss in losses.items():
        checkpointer.save(state.replace(step=state.step * 0 + step), iterator, cfg, validation_loss=loss)
    checkpointer.wait()
    assert checkpointer.steps() == [2, 5, 6]  # the best validation loss (step 2) and the newest two
    checkpointer.close()
    # A restarted run still knows which one was best.
    checkpointer = Checkpointer(tmp_path, keep=2)
    for step, loss in {7: 7.0, 8: 8.0}.items():
        checkpointer.save(state.replace(step=state.step * 0 + step), iterator, cfg, validation_loss=loss)
    checkpointer.wait()
    assert checkpointer.steps() == [2, 7, 8]
    checkpointer.close()


def test_a_checkpoint_that_does_not_restore_leaves_the_data_iterator_as_it_was(tmp_path):
    import dataclasses as dc

    import grain
    import jax

    from llm_jax.config import ExperimentConfig
    from llm_jax.training import init_train_state

    cfg = ExperimentConfig()
    iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
    checkpointer = Checkpointer(tmp_path, async_save=False)
    for step in (1, 2):
        next(iterator)
        checkpointer.save(init_train_state(cfg.model, cfg.optim, 1000, jax.random.key(0)).replace(step=step),
                          iterator, cfg)
    (tmp_path / "2" / "config" / "metadata").write_text("{not json")  # a damaged config item
    with pytest.warns(RuntimeWarning, match="2 could not be restored"):
        assert checkpointer.newest_readable_config() == cfg
    assert checkpointer.steps() == [1] and (tmp_path / "2.corrupt").is_dir()
    # A state of another structure (no clipping: one transformation fewer) does not restore.
    other = init_train_state(cfg.model, dc.replace(cfg.optim, grad_clip=None), 1000, jax.random.key(0))
    fresh = iter(grain.MapDataset.range(10).to_iter_dataset())
    with pytest.warns(RuntimeWarning, match="1 could not be restored"):
        assert checkpointer.restore_latest(other, fresh) is None
    assert next(fresh) == 0  # not moved to the set-aside checkpoint's position
    checkpointer.close()


def test_a_tokenizer_left_by_an_earlier_start_must_match_the_config(tmp_path):
    from llm_jax.data.tokenizers import CharTokenizer
    from llm_jax.training import loop

    CharTokenizer(list("abc ")).save(tmp_path / "run" / "tokenizer")  # a first start, killed before a checkpoint
    cfg = experiment.load("debug", ["data.tokenizer=sentencepiece"])
    with pytest.raises(ConfigError, match="holds a char tokenizer .* but data.tokenizer='sentencepiece'"):
        loop._tokenizer(cfg, None, tmp_path / "run")
    assert loop._tokenizer(override(cfg, ["data.tokenizer=char"]), None, tmp_path / "run").vocab_size == 7
