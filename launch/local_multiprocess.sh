#!/usr/bin/env bash
# Run `llm-jax train` as N JAX processes on this machine, joined by jax.distributed
# (gloo collectives on CPU). Each process sees DEVICES simulated CPU devices unless
# JAX_PLATFORMS says otherwise. Output of process i goes to ${LOG_DIR:-.}/process_i.log.
#
#   launch/local_multiprocess.sh 2 --experiment debug mesh.data=4 train.steps=20
set -euo pipefail
n="${1:?usage: local_multiprocess.sh NUM_PROCESSES [llm-jax train arguments ...]}"
shift
port="${PORT:-$((20000 + RANDOM % 20000))}"
devices="${DEVICES:-2}"
log_dir="${LOG_DIR:-.}"
mkdir -p "$log_dir"
pids=()
for ((i = 0; i < n; i++)); do
  LLM_JAX_COORDINATOR="127.0.0.1:${port}" LLM_JAX_NUM_PROCESSES="$n" LLM_JAX_PROCESS_ID="$i" \
  JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
    llm-jax train "$@" > "${log_dir}/process_${i}.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
tail -n 12 "${log_dir}/process_0.log"
exit "$status"
