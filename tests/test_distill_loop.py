"""Knowledge distillation through `llm-jax train` (`train.distill_from`): a smaller student
of a briefly trained teacher moves towards it; a teacher of another vocabulary is refused."""

import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import experiment
from llm_jax.config import ConfigError
from llm_jax.data.tokenizers import load_tokenizer
from llm_jax.finetune.distill import distillation_loss
from llm_jax.models import Transformer
from llm_jax.training.checkpoint import load_trained_model
from llm_jax.training.loop import train
from llm_jax.training.metrics import read_metrics
from text_runs import text_run_overrides

STUDENT = {"model.d_model": 32, "model.n_layers": 1, "model.d_ff": 64}


# Short runs: no evaluation, checkpoints or sample beyond what a test asks for.
QUIET = {"train.log_every": 5, "train.eval_every": 1000, "train.eval_steps": 1, "train.checkpoint_every": 1000,
         "train.sample_tokens": 0, "train.tensorboard": "false", "optim.warmup_steps": 2, "optim.lr": 3e-3}


def _config(corpus_file, run_dir, **extra):
    return experiment.load("debug", text_run_overrides(corpus_file, run_dir, **{**QUIET, **extra}))


@pytest.fixture(scope="module")
def teacher_dir(corpus_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    train(_config(corpus_file, run_dir, **{"train.steps": 30, "train.eval_steps": 0, "train.log_every": 30}),
          print_fn=lambda _: None)
    return run_dir


def _kl_to_teacher(student_dir, teacher_dir, corpus_file) -> float:
    """Mean per-token KL(teacher || student) at temperature 1 on the corpus' first lines."""
    tokenizer = load_tokenizer(teacher_dir / "tokenizer")
    ids = np.array(tokenizer.encode(corpus_file.read_text()[:2000])[:8 * 33]).reshape(8, 33)
    inputs, targets = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])

    def logits(run_dir):
        cfg, params, _ = load_trained_model(run_dir)
        return Transformer(cfg.model).apply({"params": params}, inputs)[0]

    _, sums = distillation_loss(logits(student_dir), logits(teacher_dir), targets, temperature=1.0, alpha=1.0)
    return float(sums["kl_sum"] / sums["tokens"])


def test_a_distilled_student_moves_towards_its_teacher(corpus_file, teacher_dir, tmp_path):
    lines = []
    student_dir = tmp_path / "student"
    result = train(_config(corpus_file, student_dir, **STUDENT, **{
        "train.steps": 15, "train.log_every": 1, "train.distill_from": str(teacher_dir),
        "train.distill_alpha": 0.9, "train.distill_temperature": 1.0}), print_fn=lines.append)

    assert any(line.startswith("distilling from") for line in lines)
    assert (student_dir / "tokenizer").is_dir()  # the teacher's, copied
    # Logged per step: step 1's KL is the untrained student's (at T = 1, the true KL).
    logged = [r["train/kl_to_teacher"] for r in read_metrics(student_dir) if "train/kl_to_teacher" in r]
    assert len(logged) == 15 and logged[-1] < 0.7 * logged[0], logged
    # Measured apart from the loop, on the trained student's checkpoint.
    assert _kl_to_teacher(student_dir, teacher_dir, corpus_file) < 0.7 * logged[0]
    # Evaluation is still the student's own cross-entropy.
    assert np.isfinite(result.validation["loss"]) and result.validation["perplexity"] > 1
    assert result.skipped_steps == 0


def test_a_teacher_with_another_vocabulary_is_refused(corpus_file, teacher_dir, tmp_path):
    cfg = _config(corpus_file, tmp_path / "student", **{"train.steps": 3, "model.vocab_size": 128,
                                                         "train.distill_from": str(teacher_dir)})
    with pytest.raises(ConfigError, match="model.vocab_size=256 but the student has model.vocab_size=128"):
        train(cfg, print_fn=lambda _: None)
    with pytest.raises(ConfigError, match="train.z_loss"):
        _config(corpus_file, tmp_path / "s", **{"train.distill_from": str(teacher_dir), "train.z_loss": 1e-4})
    with pytest.raises(ConfigError, match="train.distill_alpha"):
        _config(corpus_file, tmp_path / "s", **{"train.distill_alpha": 1.5})
