#!/usr/bin/env bash
# GPU check for the device machine (torch 2.11, triton 3.6, transformers 5.17 preinstalled, no internet).
#
#   bench/gpu_check.sh [quick | owed | tests | kernels PATTERN... | bench | scaling | all]   (default: all)
#
#   quick    one device call (< 8 min): the CUDA smoke test (tests/test_cuda_smoke.py: every kernel once in
#            bf16 and fp16, every model once; < 3 min) and the headline benchmark cases with their peers
#            (QUICK_CASES), --quick timing                     -> $OUT/smoke.log, quick.log + results
#   owed     one device call: the Inductor compile tests (tests/test_compile.py -m slow, incl. CUDA-graph
#            generation of a compiled model) and the cases whose GPU figures issues still owe (OWED_CASES:
#            Reformer and FSMT models, training loops, accelerate and compile), --quick timing
#                                                              -> $OUT/compile_tests.log, owed.log + results
#   tests    the whole test suite on CUDA, slow tests included (-x), junit xml   -> $OUT/tests.log, tests.xml
#   kernels  `tritonformers bench --filter PATTERN...` (one family, say norm_bandwidth or attention)
#                                                                               -> $OUT/kernels.log + results
#   bench    the whole benchmark suite, `tritonformers bench --out $OUT`        -> $OUT/bench.log + results
#   scaling  Reformer local/LSH layer time and memory vs N (4K..512K) vs HF      -> $OUT/scaling.log + json/png
#
# Results are written straight into $OUT as <device>-<YYYYMMDD-HHMM>.json/.md/.png (copy them into
# bench/results/ to commit them). Each step runs under `timeout` (SIGINT first, so pytest writes its
# summary and the bench writes the cases it finished; SIGKILL 30 s later): TESTS_TIMEOUT and
# BENCH_TIMEOUT, 540 s each by default, so one part fits a 10-minute device call; `all` needs two of
# them back to back, so through the device tool run `tests` and `bench` as separate calls.
# Extra arguments: PYTEST_ARGS (e.g. "-k norms"), BENCH_ARGS (e.g. "--quick"). PYTHON picks the
# interpreter (default python3). No pip install: the checkout is put on PYTHONPATH.
set -u -o pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# the autotuner logs each kernel's chosen config and its tuning time: what to prune, what to keep
export TRITON_PRINT_AUTOTUNING="${TRITON_PRINT_AUTOTUNING:-1}"
OUT="${OUT:-/tmp/out}"
PY="${PYTHON:-python3}"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-540}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-540}"
SMOKE_TIMEOUT="${SMOKE_TIMEOUT:-200}"
QUICK_CASES="${QUICK_CASES:-alibi_causal alibi_decode local_attention_64k lsh_attention_64k_2h diff_attention_4k \
norm_bandwidth fused_linear_ce int8_gemm_8192 ibert_base_b8_n128 bloom560m_greedy_b8}"
OWED_CASES="${OWED_CASES:-^reformer_ ^fsmt_ ^train_loop ^accelerate_ ^compile_}"
mkdir -p "$OUT"

part="${1:-all}"
[ $# -gt 0 ] && shift

env_log() {
    {
        date -u +"%Y-%m-%dT%H:%M:%SZ"
        git rev-parse HEAD 2>/dev/null || echo "(no git commit)"
        nvidia-smi || echo "nvidia-smi failed"
        "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__,
"| triton", triton.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")'
        "$PY" -c 'import transformers; print("transformers", transformers.__version__)' || echo "transformers missing"
    } 2>&1 | tee "$OUT/env.log"
}

run_tests() {
    echo "== tests (timeout ${TESTS_TIMEOUT}s)"
    # shellcheck disable=SC2086
    timeout -s INT -k 30 "$TESTS_TIMEOUT" "$PY" -m pytest tests -q -x -ra --junitxml="$OUT/tests.xml" \
        ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log"
}

run_bench() {  # run_bench LOGNAME [bench args...]
    local log="$1"; shift
    echo "== tritonformers bench $* (timeout ${BENCH_TIMEOUT}s)"
    # shellcheck disable=SC2086
    timeout -s INT -k 30 "$BENCH_TIMEOUT" "$PY" -m tritonformers bench --out "$OUT" "$@" ${BENCH_ARGS:-} \
        2>&1 | tee "$OUT/$log.log"
}

run_smoke() {
    echo "== CUDA smoke tests (timeout ${SMOKE_TIMEOUT}s)"
    # correctness only: each autotuned kernel runs its first config (compile_sm90.py lowers them all on a CPU)
    TRITONFORMERS_AUTOTUNE=first timeout -s INT -k 30 "$SMOKE_TIMEOUT" "$PY" -m pytest tests/test_cuda_smoke.py -q \
        -ra --durations=8 \
        2>&1 | tee "$OUT/smoke.log"
}

env_log
status=0
case "$part" in
    quick)
        run_smoke || status=$?
        # shellcheck disable=SC2086
        run_bench quick --quick --filter $QUICK_CASES || { s=$?; [ "$status" -eq 0 ] && status=$s; } ;;
    owed)
        echo "== compile tests, Inductor (timeout ${SMOKE_TIMEOUT}s)"
        timeout -s INT -k 30 "$SMOKE_TIMEOUT" "$PY" -m pytest tests/test_compile.py -q -ra -m slow --durations=8 \
            2>&1 | tee "$OUT/compile_tests.log" || status=$?
        # shellcheck disable=SC2086
        run_bench owed --quick --filter $OWED_CASES || { s=$?; [ "$status" -eq 0 ] && status=$s; } ;;
    tests)
        run_tests || status=$? ;;
    kernels)
        if [ $# -eq 0 ]; then
            echo "usage: $0 kernels PATTERN... (see: $PY -m tritonformers bench --list)" >&2
            exit 2
        fi
        run_bench kernels --filter "$@" || status=$? ;;
    bench)
        run_bench bench || status=$? ;;
    scaling)
        echo "== reformer scaling sweep (timeout ${BENCH_TIMEOUT}s)"
        timeout -s INT -k 30 "$BENCH_TIMEOUT" "$PY" -m tritonformers.benchmarks.scaling --out "$OUT" "$@" \
            2>&1 | tee "$OUT/scaling.log" || status=$? ;;
    all)
        run_tests || status=$?
        run_bench bench || { s=$?; [ "$status" -eq 0 ] && status=$s; } ;;
    *)
        echo "usage: $0 [quick | owed | tests | kernels PATTERN... | bench | scaling | all]" >&2
        exit 2 ;;
esac
echo "== done: exit status $status; files in $OUT:"
ls -l "$OUT"
exit "$status"
