#!/usr/bin/env bash
# GPU check, about 10 minutes: the test suite on the GPU, `python -m fusedopt check`, the
# 2**31-element FusedAdam check and `python -m fusedopt bench`, one suite per step (optimizer
# steps, losses, the fused linear cross-entropy, the AMP optimizer phase, host overhead, and the
# static sm_90 rows, sm90.csv, which the timings can be read beside).
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh    # from the repository root; OUT defaults to benchmarks/results
#
# Everything (one log per step, check's CSV/PNG, each bench step's CSV/PNG/Markdown, summary.txt) goes to
# $OUT/<card>/, <card> being the GPU's name as a slug (e.g. nvidia-h100-80gb-hbm3). The benchmarks
# run even when the tests fail; the script exits non-zero at the end if any step failed or timed
# out. Time limits per step (seconds; worst case 650 s in all): TEST_TIMEOUT (170), CHECK_TIMEOUT
# (45), INT64_TIMEOUT (35), BENCH_TIMEOUT (105), PRECISION_TIMEOUT (35: the low-precision rows),
# LOSS_TIMEOUT (60), LINEAR_CE_TIMEOUT (65: the fused linear cross-entropy, bf16, 8192 tokens x
# 4096 -> 128256 classes; its eager row holds ~10 GB and takes a few hundred ms a call, its
# compiled row is an inductor build), AMP_TIMEOUT (50), HOST_TIMEOUT (25), SM90_TIMEOUT (60: ~110 s of
# CPU spread over up to 8 processes, less with Triton's cache warm). None of these limits
# has been measured on a GPU yet. The bench steps but host get a --budget 30 s under their
# limit (precision: 20 s): rows not started by then are written as skipped (the torch.compile
# rows run last), so the CSV, table and plot are always written.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 # logs stay complete when a step is cut by its timeout
if [[ "${TRITON_INTERPRET:-}" == 1 ]]; then
    echo "TRITON_INTERPRET=1 was set: unset here, the GPU runs the compiled kernels."
fi
unset TRITON_INTERPRET

card=$($PY -c 'import re, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))') || card=unknown
results="${OUT:-benchmarks/results}/$card"
mkdir -p "$results"
echo "results: $results"

failed=()

# step NAME LIMIT CMD...: run CMD under `timeout LIMIT`, output to the screen and to $results/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS rc=0
    echo
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$results/$name.log" || rc=$?
    echo
    if ((rc == 124 || rc == 137)); then
        echo "=== $name: TIMED OUT after $((SECONDS - start)) s" | tee -a "$results/$name.log"
    else
        echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$results/$name.log"
    fi
    if ((rc != 0)); then
        failed+=("$name (exit $rc)")
    fi
    return 0
}

{
    echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    git status --short 2>/dev/null || true
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -L || true
        nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm,clocks.max.memory,power.limit \
            --format=csv || true
    else
        echo "nvidia-smi: not available"
    fi
    $PY --version
    $PY -c 'import torch, triton
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| triton", triton.__version__)
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (no CUDA)")' ||
        echo "python: torch / triton import failed"
} 2>&1 | tee "$results/environment.log"

# bench SUITE LIMIT ARGS...: step bench_SUITE, `python -m fusedopt bench --suites SUITE ARGS...`.
bench() {
    local suite=$1 limit=$2
    shift 2
    step "bench_$suite" "$limit" $PY -m fusedopt bench --suites "$suite" --out "$results" --no-progress "$@"
}

bench_timeout=${BENCH_TIMEOUT:-105}
precision_timeout=${PRECISION_TIMEOUT:-35}
loss_timeout=${LOSS_TIMEOUT:-60}
linear_ce_timeout=${LINEAR_CE_TIMEOUT:-65}
amp_timeout=${AMP_TIMEOUT:-50}
# tests/test_compile.py and tests/test_sm90.py (sm_90 compilation without a GPU, ~90 s and ~110 s of
# CPU) are left out: here the CUDA tests compile and run the same kernels for real, and the sm90
# step below writes the facts test_sm90.py checks.
step tests "${TEST_TIMEOUT:-170}" $PY -m pytest -q --maxfail=20 tests --ignore tests/test_compile.py \
    --ignore tests/test_sm90.py
step check "${CHECK_TIMEOUT:-45}" $PY -m fusedopt check --no-progress --out "$results"
step check_int64 "${INT64_TIMEOUT:-35}" $PY benchmarks/check_int64.py
bench optim "$bench_timeout" --layouts single64m gpt2 many4k --dtypes fp32 bf16 --budget $((bench_timeout - 30))
bench optim "$precision_timeout" --optimizers adamw adamw-master adamw-kahan adamw-sr adamw-bf16state adamw-int8 \
    --layouts gpt2 --dtypes bf16 --impls fusedopt torch-fused --budget $((precision_timeout - 20))
bench losses "$loss_timeout" --losses mean-64m mse-64m l1-64m smooth_l1-64m huber-64m ce-8192x50257 ce-4096x128256 \
    --dtypes fp32 bf16 --budget $((loss_timeout - 30))
# The fused linear cross-entropy in its own step, bf16 only (in fp32 its 6 N H V = 26 TFLOP run
# without tensor cores: ~0.5 s a call): fusedopt (default chunk, 2048 rows, the vocabulary order in
# blocks of 4096 classes), eager, compiled last.
step bench_linear_ce "$linear_ce_timeout" $PY -m fusedopt bench --suites losses --out "$results" --no-progress \
    --losses lce-8192x4096x128256 lce-8192x4096x128256-chunk2048 lce-8192x4096x128256-vocab4096 \
    --dtypes bf16 --budget $((linear_ce_timeout - 30))
bench amp "$amp_timeout" --budget $((amp_timeout - 30))
bench host "${HOST_TIMEOUT:-25}" --optimizers adam sgd --layouts many4k gpt2 --dtypes fp32
# Static facts of every launched kernel variant for sm_90 with this machine's Triton (no kernel
# runs): sm90.csv/.md/.png, one row per (kernel, variant), beside the timed rows above.
bench sm90 "${SM90_TIMEOUT:-60}"

{
    echo
    echo "=== summary ($card, ${SECONDS} s in all)"
    if ((${#failed[@]} == 0)); then
        echo "all steps passed"
    else
        printf 'FAILED: %s\n' "${failed[@]}"
    fi
} | tee "$results/summary.txt"
((${#failed[@]} == 0))
