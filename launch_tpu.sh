#!/usr/bin/env bash
# Run magi-jax on every worker of a TPU VM slice: one program, one device mesh over all chips.
#   ./launch_tpu.sh <tpu-name> <zone> <config> [generate flags...]
#   ./launch_tpu.sh magi-v5p us-east5-a 24B_distill --prompt "A red fox" --output_path fox.mp4
# Each worker gets this checkout (rsync to ~/magi-jax), a venv from requirements.txt with TPU
# JAX, and runs the same generate command; jax.distributed joins them (MAGI_DISTRIBUTED=1) and
# only process 0 writes the video (on worker 0).
set -euo pipefail
usage="usage: $0 <tpu-name> <zone> <config> [generate flags...]"
tpu=${1:?missing the TPU name. $usage}; zone=${2:?missing the zone. $usage}; config=${3:?missing the config (variant or JSON). $usage}
shift 3
command -v gcloud >/dev/null || { echo "gcloud is not installed (https://cloud.google.com/sdk)" >&2; exit 2; }
ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all)
gcloud compute tpus tpu-vm scp --zone "$zone" --worker=all --recurse "$(cd "$(dirname "$0")" && pwd)" "$tpu":magi-jax
"${ssh[@]}" --command 'cd ~/magi-jax && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt "jax[tpu]"'
args=$(printf ' %q' "$@")
"${ssh[@]}" --command "cd ~/magi-jax && MAGI_DISTRIBUTED=1 .venv/bin/python -m magi_jax.generate --config_file $(printf '%q' "$config")$args"
