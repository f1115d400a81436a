"""Joining a multi-process JAX job, from the environment, with JAX's own runtime.

No cluster layer of our own: `jax.distributed.initialize` already knows SLURM and Cloud
TPU VM pods. For anything else (several processes on one machine, a custom cluster) set

    LLM_JAX_COORDINATOR=host:port  LLM_JAX_NUM_PROCESSES=N  LLM_JAX_PROCESS_ID=i

On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "LLM_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "LLM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LLM_JAX_PROCESS_ID"


def _int_env(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise ValueError(f"{ENV_COORDINATOR} is set, so {name} must be set too (an integer)")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def initialize_from_env() -> bool:
    """Start the distributed runtime if the environment describes a multi-process job.

    Returns True when it did. Call it before anything touches a JAX device.
    """
    explicit = os.environ.get(ENV_COORDINATOR)
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if not (explicit or slurm or tpu_pod):
        return False
    if explicit:
        num, pid = _int_env(ENV_NUM_PROCESSES), _int_env(ENV_PROCESS_ID)
        if not 0 <= pid < num:
            raise ValueError(f"{ENV_PROCESS_ID}={pid} must be in [0, {ENV_NUM_PROCESSES}={num})")
    # Only the CPU backend reads this; GPUs and TPUs use their own interconnect.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address=explicit, num_processes=num, process_id=pid)
    else:
        jax.distributed.initialize()  # SLURM / TPU pod: JAX reads its own environment
    return True
