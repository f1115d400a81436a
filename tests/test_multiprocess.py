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


def _losses(output: str) -> dict:
    line = next(line for line in output.splitlines() if line.startswith("LOSSES "))
    return json.loads(line[len("LOSSES "):])


def test_two_processes_match_one():
    reference = subprocess.run([sys.executable, str(SCRIPT)], env=_env(4), capture_output=True, text=True,
                               timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = _losses(reference.stdout)
    assert expected["count"] == 1

    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(2, LLM_JAX_COORDINATOR=f"127.0.0.1:{port}", LLM_JAX_NUM_PROCESSES="2",
                                  LLM_JAX_PROCESS_ID=str(i)))
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    results = [_losses(out) for out, _ in outputs]
    assert sorted(r["process"] for r in results) == [0, 1] and all(r["count"] == 2 for r in results)
    for r in results:
        np.testing.assert_allclose(r["losses"], expected["losses"], rtol=1e-5)
    assert expected["losses"][-1] < expected["losses"][0]


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
