"""Two JAX processes on localhost (gloo CPU collectives) train like one process."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

SCRIPT = pathlib.Path(__file__).with_name("multiprocess_train_steps.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_JAX_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
    return env


def _run_two_processes(command: list[str], expect_rc: int = 0) -> list[str]:
    """`command` as processes 0 and 1 of one jax.distributed job (two CPU devices each); their
    stdouts (or, when they are expected to fail, their stderrs)."""
    port = _free_port()
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(2, LLM_JAX_COORDINATOR=f"127.0.0.1:{port}", LLM_JAX_NUM_PROCESSES="2",
                                  LLM_JAX_PROCESS_ID=str(i)))
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == expect_rc, err[-3000:]
    return [out if expect_rc == 0 else err for out, err in outputs]


def test_a_mesh_whose_data_axes_do_not_span_the_processes_is_refused(tmp_path):
    """With mesh.data = mesh.fsdp = 1 over two processes, the batch would be one array that
    both processes fill with different rows of their own."""
    errors = _run_two_processes([sys.executable, "-m", "llm_jax.cli", "train", "--experiment", "debug",
                                 "mesh.data=1", "mesh.tensor=4", "train.batch_size=8",
                                 f"train.run_dir={tmp_path / 'run'}"], expect_rc=2)
    for err in errors:
        assert "mesh.data x mesh.fsdp = 1 does not split the batch across the 2 JAX processes" in err


def _losses(output: str) -> dict:
    line = next(line for line in output.splitlines() if line.startswith("LOSSES "))
    return json.loads(line[len("LOSSES "):])


def test_two_processes_match_one():
    import jax

    from multiprocess_train_steps import train_losses

    expected = train_losses(jax.devices()[:4])  # the same mesh in this one process
    results = [_losses(out) for out in _run_two_processes([sys.executable, str(SCRIPT)])]
    assert sorted(r["process"] for r in results) == [0, 1] and all(r["count"] == 2 for r in results)
    for r in results:
        np.testing.assert_allclose(r["losses"], expected, rtol=1e-5)
    assert expected[-1] < expected[0]


def test_initialize_from_env_checks_its_variables(monkeypatch):
    import pytest

    from llm_jax.parallel.distributed import initialize_from_env

    for name in ("LLM_JAX_COORDINATOR", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert initialize_from_env() is False  # a single process: nothing to join
    monkeypatch.setenv("LLM_JAX_COORDINATOR", "127.0.0.1:1")
    with pytest.raises(ValueError, match="LLM_JAX_NUM_PROCESSES must be set"):
        initialize_from_env()
    monkeypatch.setenv("LLM_JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("LLM_JAX_PROCESS_ID", "two")
    with pytest.raises(ValueError, match="'two' is not an integer"):
        initialize_from_env()
    monkeypatch.setenv("LLM_JAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match=r"must be in \[0, LLM_JAX_NUM_PROCESSES=2\)"):
        initialize_from_env()


def _train_loss(output: str) -> float:
    line = next(line for line in output.splitlines() if line.strip().startswith("train loss"))
    return float(line.split()[-1])


def test_two_processes_run_the_train_loop_and_write_one_checkpoint(tmp_path):
    """The whole `llm-jax train` loop (data by process, sharded state, collective checkpoint,
    an evaluation where the processes' validation shares differ in length)."""
    import math

    import jax

    from llm_jax import experiment
    from llm_jax.data.pipeline import open_corpus
    from llm_jax.training.checkpoint import load_trained_model

    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(12):  # documents for both processes' shares (each reads every other one)
        (texts / f"doc{i:02d}.txt").write_text(" ".join(f"line {i} word {j}" for j in range(60)))
    # The validation tail (data.split=tail): a long document for process 0, a short one for
    # process 1, so their shares hold 3 and 1 batches; both must evaluate the same steps.
    (texts / "zz_long.txt").write_text(" ".join(f"long word {j}" for j in range(180)))
    (texts / "zz_short.txt").write_text(" ".join(f"short {j}" for j in range(18)))
    run_dir = tmp_path / "run"
    overrides = ["data.source=text", f"data.path={texts}", f"data.data_dir={tmp_path / 'prepared'}",
                 "data.tokenizer=char", "data.seq_len=32", "train.batch_size=8", "train.steps=3",
                 "optim.warmup_steps=1", "train.eval_steps=3", "train.eval_every=3", "data.split=tail",
                 "data.validation_fraction=0.17", "train.sample_tokens=0", "train.checkpoint_every=3",
                 "train.progress_bar=false", "train.tensorboard=false", f"train.run_dir={run_dir}",
                 "mesh.data=2", "mesh.fsdp=2"]
    open_corpus(experiment.load("debug", overrides).data)  # prepared once here, so the two do not race
    outputs = _run_two_processes([sys.executable, "-m", "llm_jax.cli", "train", "--experiment", "debug", *overrides])
    losses = [_train_loss(out) for out in outputs]
    assert losses[0] == losses[1] and math.isfinite(losses[0])  # one global loss, seen by both
    validation = [next(line for line in out.splitlines() if "validation loss" in line) for out in outputs]
    assert validation[0] == validation[1]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["3"]
    _, params, step = load_trained_model(run_dir)  # the collective write is one whole checkpoint
    assert step == 3 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))
