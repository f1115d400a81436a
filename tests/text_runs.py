"""`llm-jax train` runs of the debug experiment on the `corpus_file` text (tests/conftest.py),
shared by the train-loop and distillation tests."""


def text_run_overrides(corpus_file, run_dir, **settings) -> list[str]:
    """Overrides for a run on that text (character tokenizer, 32-token rows, batch 8, no
    progress bar), with `settings` on top."""
    base = {
        "data.source": "text", "data.path": str(corpus_file), "data.split": "tail", "data.tokenizer": "char",
        "data.data_dir": str(corpus_file.parent / "datasets"), "data.seq_len": 32,
        "train.run_dir": str(run_dir), "train.batch_size": 8, "train.progress_bar": "false",
    }
    return [f"{k}={v}" for k, v in {**base, **settings}.items()]
