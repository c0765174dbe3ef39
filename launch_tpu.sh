#!/usr/bin/env bash
# Run magi-jax on every worker of a TPU VM slice: one program, one device mesh over all chips.
#   ./launch_tpu.sh [--dry-run] <tpu-name> <zone> <config> [generate flags...]
#   ./launch_tpu.sh magi-v5p us-east5-a 24B_distill --mesh auto --prompt "A red fox" --output_path fox.mp4
#
# Every run leaves each worker in the same state, however many times it is repeated:
#   ~/magi-jax        this checkout's files, replaced whole (no .git, .venv, outputs or caches)
#   ~/magi-jax-venv   a virtualenv with the package's runtime, gcsfs and TPU JAX (made once, then updated)
# A stock TPU VM image may lack python3-venv: virtualenv is then installed with pip --user.
# jax.distributed joins the workers (MAGI_DISTRIBUTED=1); only process 0 writes the video.
# Checkpoints may be gs:// URLs (--dit_ckpt gs://bucket/4.5B_distill.magi_jax ...): every worker
# reads the same converted checkpoints from the bucket.
# --dry-run prints the commands instead of running them (no gcloud needed).
set -euo pipefail
dry=0
if [[ ${1:-} == --dry-run ]]; then dry=1; shift; fi
usage="usage: $0 [--dry-run] <tpu-name> <zone> <config> [generate flags...]"
tpu=${1:?missing the TPU name. $usage}; zone=${2:?missing the zone. $usage}; config=${3:?missing the config (variant or JSON). $usage}
shift 3
here=$(cd "$(dirname "$0")" && pwd)

run() {  # prints the command (quoted, as a shell reads it) or runs it
    if ((dry)); then printf '%q ' "$@"; echo; else "$@"; fi
}
if ((!dry)); then
    command -v gcloud >/dev/null || { echo "gcloud is not installed (https://cloud.google.com/sdk)" >&2; exit 2; }
fi

# the code, without what is local to this machine
bundle=${TMPDIR:-/tmp}/magi-jax-$$.tgz
((dry)) || trap 'rm -f "$bundle"' EXIT
run tar -czf "$bundle" -C "$here" --exclude=.git --exclude=.venv --exclude='*.mp4' --exclude=__pycache__ \
    --exclude=.pytest_cache --exclude=outputs --exclude=.wip .
ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command)
run gcloud compute tpus tpu-vm scp --zone "$zone" --worker=all "$bundle" "$tpu:magi-jax.tgz"
# replace the code whole (files removed here disappear there too), then the environment
run "${ssh[@]}" 'rm -rf ~/magi-jax.new && mkdir ~/magi-jax.new && tar -xzf ~/magi-jax.tgz -C ~/magi-jax.new && rm -rf ~/magi-jax && mv ~/magi-jax.new ~/magi-jax && rm ~/magi-jax.tgz'
run "${ssh[@]}" 'test -x ~/magi-jax-venv/bin/python || python3 -m venv ~/magi-jax-venv || { python3 -m pip install -q --user virtualenv && python3 -m virtualenv ~/magi-jax-venv; }; ~/magi-jax-venv/bin/pip install -q "$HOME/magi-jax[gcs]" "jax[tpu]"'
args=$(printf ' %q' "$@")
run "${ssh[@]}" "cd ~/magi-jax && MAGI_DISTRIBUTED=1 ~/magi-jax-venv/bin/python -m magi_jax.generate --config_file $(printf '%q' "$config")$args"
