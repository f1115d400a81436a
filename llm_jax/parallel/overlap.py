"""XLA flags that overlap collectives with compute, chosen per platform by the launcher.

FSDP gathers every layer's weights and reduce-scatters its gradients; tensor parallelism
all-reduces inside every block; the pipeline passes activations around a ring. On GPUs
and TPUs those collectives can run while independent compute proceeds, if XLA is told
to schedule them that way. The flags must be in the environment before JAX creates its
backend, so `llm-jax train` calls `set_overlap_flags()` first thing.

    gpu  XLA_FLAGS         latency-hiding scheduler; pipelined all-gather, reduce-scatter and
                           all-reduce across the layer scan (with double-buffered loops);
                           collective matmul (windowed einsum) when the mesh has a tensor axis
    tpu  LIBTPU_INIT_ARGS  latency-hiding scheduler; async collective fusion (all-gather
                           included, over several steps) overlapped with compute; async
                           all-gather and collective-permute; collective matmul when tensor > 1
    cpu  nothing           (the host backend has no asynchronous collectives to schedule)

Flags already in the environment win: a flag the user set keeps their value, and
`LLM_JAX_OVERLAP_FLAGS=0` turns the whole thing off.
"""

from __future__ import annotations

import importlib.util
import os
from typing import MutableMapping

ENV_SWITCH = "LLM_JAX_OVERLAP_FLAGS"

# Where each platform reads its compiler flags.
FLAG_VARIABLE = {"gpu": "XLA_FLAGS", "tpu": "LIBTPU_INIT_ARGS"}

OVERLAP_FLAGS = {
    "gpu": (
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "--xla_gpu_enable_pipelined_all_gather=true",
        "--xla_gpu_enable_pipelined_reduce_scatter=true",
        "--xla_gpu_enable_pipelined_all_reduce=true",
        "--xla_gpu_enable_while_loop_double_buffering=true",
    ),
    "tpu": (
        "--xla_tpu_enable_latency_hiding_scheduler=true",
        "--xla_tpu_enable_async_collective_fusion=true",
        "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
        "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
        "--xla_tpu_overlap_compute_collective_tc=true",
        "--xla_enable_async_all_gather=true",
        "--xla_enable_async_collective_permute=true",
    ),
    "cpu": (),
}

# Collective matmul: a matmul whose operand is all-gathered (or whose result is
# reduce-scattered) over the tensor axis is split into ring steps that overlap the
# transfers with partial products. Only worth it with tensor parallelism.
COLLECTIVE_MATMUL_FLAGS = {
    "gpu": (
        "--xla_gpu_threshold_for_windowed_einsum_mib=0",
        "--xla_gpu_multi_streamed_windowed_einsum=true",
    ),
    "tpu": (
        "--xla_tpu_enable_windowed_einsum_for_all_gather=true",
        "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=true",
    ),
    "cpu": (),
}


def detect_platform(environ: MutableMapping[str, str] = os.environ) -> str:
    """The platform JAX will pick, without starting it: JAX_PLATFORMS, else what is installed."""
    requested = environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if requested:
        return {"cuda": "gpu", "rocm": "gpu"}.get(requested, requested)
    if importlib.util.find_spec("libtpu") is not None:
        return "tpu"
    if any(importlib.util.find_spec(p) is not None for p in ("jax_cuda13_plugin", "jax_cuda12_plugin")):
        return "gpu"
    return "cpu"


def overlap_flags(platform: str, collective_matmul: bool = False) -> tuple[str, ...]:
    if platform not in OVERLAP_FLAGS:
        raise ValueError(f"no overlap flags for platform {platform!r}; known: {sorted(OVERLAP_FLAGS)}")
    return OVERLAP_FLAGS[platform] + (COLLECTIVE_MATMUL_FLAGS[platform] if collective_matmul else ())


def merge_flags(existing: str, extra: tuple[str, ...]) -> str:
    """`existing` plus those of `extra` whose flag name it does not already set."""
    names = {flag.split("=", 1)[0] for flag in existing.split()}
    added = [flag for flag in extra if flag.split("=", 1)[0] not in names]
    return " ".join([existing.strip(), *added]).strip()


def set_overlap_flags(collective_matmul: bool = False, environ: MutableMapping[str, str] = os.environ,
                      platform: str | None = None) -> tuple[str, ...]:
    """Add this platform's overlap flags to its flag variable; returns the flags added.

    Call before anything starts a JAX backend (they are read once, at start-up).
    """
    if environ.get(ENV_SWITCH, "1").lower() in ("0", "false", "no"):
        return ()
    platform = platform or detect_platform(environ)
    variable = FLAG_VARIABLE.get(platform)
    if variable is None:
        return ()
    before = environ.get(variable, "")
    environ[variable] = merge_flags(before, overlap_flags(platform, collective_matmul))
    return tuple(f for f in environ[variable].split() if f not in before.split())
