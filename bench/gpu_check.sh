#!/usr/bin/env bash
# Everything a session lent an NVIDIA GPU checks, as one command: the lease is 15 minutes of
# device time, start included, so there is one try. The checks are compile-bound (tiny models)
# and the machine has 16 cores, so they run side by side, each with its own time limit, and
# each logs under $LOGS (default ./gpu-logs):
#   sampler_parity   the 13 whole upstream sampler runs (tests/test_sampler_parity.py), one line
#                    per test as it ends, so a run cut short still says which passed;
#   parity_tests     every other parity fixture on the GPU (attention implementations, VAE, T5,
#                    fp8, schedule, released variants);
#   gpu_parity       bench/gpu_parity.py: every recorded DiT call replayed (velocity and cache
#                    rows; exits 1 on a failure), then a small guided bf16 forward's MFU;
#   EXTRA            any further command the caller names (a diagnostic), run beside them.
# The tests compile as a generation does (MAGI_TEST_COMPILE=optimized, autotuning on). The
# workers share one autotuning cache. On 2026-12-04 fourteen workers, each autotuning alone,
# finished none of the 13 sampler runs in 210 s beside the other files; later that day this
# script ran them all in 311 s (56-241 s each; on a 2-core CPU 20-65 s each), 390 s in all.
# With pytest-timeout installed, a test stuck for TEST_LIMIT seconds dumps its stacks and fails.
# Exit status: non-zero when any lane failed.
#
#   bash bench/gpu_check.sh                 # from the project root
#   LOGS=$OUT bash bench/gpu_check.sh       # logs where the caller collects them
#   FORWARD=1 ...                           # then bench/dit_forward.py at 720x720, bf16, cuDNN, with
#                                           # where its time goes kernel by kernel (--profile)
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
failed=()
lane() {  # lane NAME SECONDS COMMAND...: run, log, and report with its exit status
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s (limit ${limit}s) $([ $rc -eq 124 ] && echo TIMED OUT)"
    return $rc
}
report() {  # report NAME [LINES [PATTERN]]: the last LINES lines of the lane's log that match PATTERN
    echo "----- $1"
    grep -E "${3:-FAILED|ERROR|Error|error:|Timeout|passed|failed}" "$LOGS/$1.log" | tail -n "${2:-40}"
}

lane env 60 bash -c "nvidia-smi -L; nproc; $PY -c 'import jax, flax, optax, orbax.checkpoint as o, numpy;
print(\"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__, \"numpy\", numpy.__version__);
print(jax.devices())'" || failed+=(env)
cat "$LOGS/env.log"

mkdir -p /tmp/magi-autotune
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_per_fusion_autotune_cache_dir=/tmp/magi-autotune"
timeout_flags=()
$PY -c "import pytest_timeout" 2>/dev/null && timeout_flags=(--timeout "${TEST_LIMIT:-300}" --timeout_method thread)
tests() {  # NAME LIMIT WORKERS FILES...: the parity tests compiled as a generation is
    local name=$1 limit=$2 workers=$3
    shift 3
    lane "$name" "$limit" env MAGI_TEST_COMPILE=optimized $PY -m pytest -v -n "$workers" --dist worksteal \
        -p no:cacheprovider -p no:benchmark --tb=short -rfE --durations=0 "${timeout_flags[@]}" "$@"
}
pids=()
names=()
start() {  # start NAME COMMAND...: a lane in the background
    local name=$1
    shift
    "$@" &
    pids+=($!)
    names+=("$name")
}
start sampler_parity tests sampler_parity "${SAMPLER_LIMIT:-420}" 9 tests/test_sampler_parity.py
start parity_tests tests parity_tests "${PARITY_LIMIT:-300}" 3 tests/test_fp8_linear.py tests/test_attention.py \
    tests/test_vae.py tests/test_t5.py tests/test_special_tokens.py tests/test_schedule.py tests/test_released_variants.py
start gpu_parity lane gpu_parity "${BENCH_LIMIT:-420}" $PY bench/gpu_parity.py --layers 2 --height 256 --width 256
[ -n "${EXTRA:-}" ] && start extra lane extra "${EXTRA_LIMIT:-300}" bash -c "$EXTRA"
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed+=("${names[$i]}")
done
if [ -n "${FORWARD:-}" ]; then
    lane dit_forward 120 env MAGI_ATTENTION=cudnn $PY bench/dit_forward.py --config 4.5B_distill --layers 1 \
        --height 720 --width 720 --chunks 4 --dtype bfloat16 --repeat 5 --profile /tmp/magi-trace || failed+=(dit_forward)
fi

report sampler_parity 60 "PASSED|FAILED|ERROR|Timeout|passed|failed|s call"
report parity_tests 40
report gpu_parity 40 "FAIL|fail|Error|calls|MFU|TFLOP"
[ -n "${EXTRA:-}" ] && report extra 60 "."
echo "=== failed lanes: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
