#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM pod slice: the same command on all hosts;
# jax.distributed.initialize discovers the pod from the TPU VM's metadata.
#
#   launch/tpu_vm.sh my-tpu us-central2-b --experiment llama3_8b mesh.fsdp=-1 train.run_dir=gs://bucket/run
#
# Assumes the repository is checked out at ~/llm_jax on every worker (e.g. with
# `gcloud compute tpus tpu-vm ssh ... --worker=all --command "git clone ..."`) and that
# train.run_dir is a path all workers share (a GCS bucket or an NFS mount). `llm-jax train`
# adds the TPU overlap flags to LIBTPU_INIT_ARGS (llm_jax/parallel/overlap.py).
set -euo pipefail
name="${1:?usage: tpu_vm.sh TPU_NAME ZONE [llm-jax train arguments ...]}"
zone="${2:?usage: tpu_vm.sh TPU_NAME ZONE [llm-jax train arguments ...]}"
shift 2
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command \
  "cd ~/llm_jax && pip install -q -e . 'jax[tpu]' && llm-jax train ${args}"
