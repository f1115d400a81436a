"""Per-platform XLA flags for overlapping collectives with compute (llm_jax/parallel/overlap.py)."""

import os
import subprocess
import sys

import pytest

from llm_jax.parallel.overlap import (
    COLLECTIVE_MATMUL_FLAGS,
    OVERLAP_FLAGS,
    detect_platform,
    merge_flags,
    set_overlap_flags,
)


def test_each_platform_gets_its_flags_in_its_own_variable():
    gpu, tpu, cpu = {}, {}, {}
    set_overlap_flags(environ=gpu, platform="gpu")
    set_overlap_flags(environ=tpu, platform="tpu")
    set_overlap_flags(environ=cpu, platform="cpu")
    assert gpu["XLA_FLAGS"].split() == list(OVERLAP_FLAGS["gpu"]) and "LIBTPU_INIT_ARGS" not in gpu
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in gpu["XLA_FLAGS"]
    assert tpu["LIBTPU_INIT_ARGS"].split() == list(OVERLAP_FLAGS["tpu"]) and "XLA_FLAGS" not in tpu
    assert "--xla_tpu_enable_async_collective_fusion=true" in tpu["LIBTPU_INIT_ARGS"]
    assert cpu == {}  # nothing asynchronous to schedule on the host backend


def test_collective_matmul_only_when_asked():
    plain, tensor = {}, {}
    set_overlap_flags(environ=plain, platform="tpu")
    set_overlap_flags(collective_matmul=True, environ=tensor, platform="tpu")
    for flag in COLLECTIVE_MATMUL_FLAGS["tpu"]:
        assert flag not in plain["LIBTPU_INIT_ARGS"] and flag in tensor["LIBTPU_INIT_ARGS"]


def test_flags_the_user_set_are_kept():
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/hlo --xla_gpu_enable_latency_hiding_scheduler=false"}
    added = set_overlap_flags(environ=env, platform="gpu")
    flags = env["XLA_FLAGS"].split()
    assert flags[:2] == ["--xla_dump_to=/tmp/hlo", "--xla_gpu_enable_latency_hiding_scheduler=false"]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in flags and added
    assert set(flags[2:]) == set(OVERLAP_FLAGS["gpu"][1:]) == set(added)
    assert merge_flags(env["XLA_FLAGS"], OVERLAP_FLAGS["gpu"]) == env["XLA_FLAGS"]  # idempotent
    off = {"LLM_JAX_OVERLAP_FLAGS": "0", "XLA_FLAGS": "--xla_dump_to=x"}
    assert set_overlap_flags(environ=off, platform="gpu") == () and off["XLA_FLAGS"] == "--xla_dump_to=x"


@pytest.mark.parametrize("value, platform", [("cuda", "gpu"), ("tpu", "tpu"), ("cpu", "cpu"), ("rocm,cpu", "gpu")])
def test_platform_comes_from_jax_platforms(value, platform):
    assert detect_platform({"JAX_PLATFORMS": value}) == platform


def test_gpu_flags_are_known_to_this_xla():
    # XLA aborts at start-up on a flag it does not know; the GPU flags live in every jaxlib
    # (the TPU ones only in libtpu, so they cannot be checked here).
    flags = " ".join(OVERLAP_FLAGS["gpu"] + COLLECTIVE_MATMUL_FLAGS["gpu"])
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.ones(2).sum())"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "2.0" in run.stdout, run.stderr[-2000:]
