#!/usr/bin/env bash
# Everything a session lent an NVIDIA GPU checks, as one command (the lease is short), most
# telling first:
#   1. bench/gpu_parity.py: every recorded DiT call replayed (velocity and cache rows; exits 1
#      on a failure), then a small 4.5B-shaped guided bf16 forward's MFU;
#   2. bench/dit_forward.py at 4.5B layer shapes, 720x720 window, 1 layer, bf16, with cuDNN's
#      flash attention (our XLA flash loop ran at 0.06 of the matmul there on 2026-12-04, and
#      `dpa` writes every score: 280 GB), and where its time goes, kernel by kernel;
#   3. the parity tests on the GPU (every fixture, the attention implementations, compiled as
#      a generation is: MAGI_TEST_COMPILE=optimized), the whole sampler runs last, one line per
#      test as it ends, so a run cut short still says which passed; with pytest-timeout
#      installed, a test stuck for TEST_LIMIT seconds dumps its stacks and fails.
# Each step has its own time limit so a slow step leaves the rest their turn; each writes its
# log under $LOGS (default ./gpu-logs). Exit status: non-zero when any step failed.
#
#   bash bench/gpu_check.sh                 # from the project root
#   LOGS=$OUT bash bench/gpu_check.sh       # logs where the caller collects them
#
# Packages the machine lacks can travel as wheels in ./.whl (installed to /tmp/site first). The
# lent H200 of 2026-12-04 (python 3.12, jax 0.11.2) lacked five, fetched beforehand with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl zstandard ftfy wcwidth beautifulsoup4 soupsieve
set -u
cd "$(dirname "$0")/.."
LOGS=${LOGS:-gpu-logs}
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
status=0
step() {  # step NAME SECONDS COMMAND...: run, log, and remember a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n "${TAIL:-25}" "$LOGS/$name.log"
    echo "=== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

step env 60 bash -c "nvidia-smi -L; $PY -c 'import jax, flax, optax, orbax.checkpoint as o, numpy;
print(\"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__, \"numpy\", numpy.__version__);
print(jax.devices())'; $PY -c 'import flash_attn' 2>&1 | tail -1"
step gpu_parity "${BENCH_LIMIT:-160}" $PY bench/gpu_parity.py --layers 2 --height 256 --width 256
step dit_forward 80 env MAGI_ATTENTION=cudnn $PY bench/dit_forward.py --config 4.5B_distill \
    --layers 1 --height 720 --width 720 --chunks 4 --dtype bfloat16 --repeat 5 --profile /tmp/magi-trace
timeout_flags=()
$PY -c "import pytest_timeout" 2>/dev/null && timeout_flags=(--timeout "${TEST_LIMIT:-150}" --timeout_method thread)
tests() {  # NAME LIMIT WORKERS FILES...: the parity tests compiled as a generation is
    local name=$1 limit=$2 workers=$3
    shift 3
    step "$name" "$limit" env MAGI_TEST_COMPILE=optimized $PY -m pytest -v -n "$workers" -p no:cacheprovider \
        -p no:benchmark --tb=short -rfE "${timeout_flags[@]}" "$@"
}
# test_dit_parity's calls are step 1's. The quick files first, so that their failures' reasons
# print; then the whole sampler runs (2026-12-04: none of 13 finished in 210 s beside the rest)
tests parity_tests "${PARITY_LIMIT:-120}" 8 tests/test_fp8_linear.py tests/test_attention.py tests/test_vae.py \
    tests/test_t5.py tests/test_special_tokens.py tests/test_schedule.py tests/test_released_variants.py
tests sampler_parity "${SAMPLER_LIMIT:-300}" 8 tests/test_sampler_parity.py
exit $status
