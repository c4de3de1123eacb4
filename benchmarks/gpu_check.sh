#!/usr/bin/env bash
# The prepared GPU check: on one GPU (an H200: under 10 minutes), the `cuda` tests, then the
# trainer's bf16 step of the paper-width prior and a paper-width decoder slice with MFU, peak
# memory against `unclip launch --plan`, sampling rates, the UNet kernels and torch.compile;
# writes benchmarks/RESULTS_gpu.md (see benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh                 # on a CUDA machine, from a fresh checkout
#   bash benchmarks/gpu_check.sh --dry [--out F] # on a CPU: the same steps at toy sizes (CI)
#
# Needs the project installed (`pip install -e '.[test]'`); PYTHON picks the interpreter.
# Each half runs under its own time limit, so the whole script ends within TOTAL_S seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry] [--out FILE]" >&2; exit 2 ;;
  esac
  shift
done
TOTAL_S=${TOTAL_S:-570}
TESTS_S=${TESTS_S:-270}
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-${TMPDIR:-/tmp}/RESULTS_gpu.dry.md}
  TESTS_S=120
  MEASURE_ARGS=(--dry)
else
  OUT=${OUT:-benchmarks/RESULTS_gpu.md}
  MEASURE_ARGS=()
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_check: no CUDA device here (bash benchmarks/gpu_check.sh --dry checks the script on a CPU)" >&2
    exit 2
  }
fi
started=$(date +%s)

echo "== cuda tests (limit ${TESTS_S} s)"
log=$(mktemp)
timeout --kill-after=10 "$TESTS_S" "$PY" -m pytest -m cuda tests/test_cuda.py -q -rfEs -p no:cacheprovider 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
summary=$(grep -E "(passed|failed|skipped|error|no tests ran).* in [0-9.]+s" "$log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')
[ -n "$summary" ] || summary="no summary (pytest exit $status)"
[ "$status" = 124 ] && summary="$summary; stopped at the ${TESTS_S} s limit"
failed=$(grep -E "^(FAILED|ERROR) " "$log" | cut -d' ' -f2 | tr '\n' ' ')
[ -n "$failed" ] && summary="$summary (failing: $failed)"
rm -f "$log"

left=$((TOTAL_S - ($(date +%s) - started)))
echo "== measurements (limit ${left} s)"
# the sections stop starting new work 45 s before the limit (set-up, the report)
timeout --kill-after=10 "$left" "$PY" -m benchmarks.gpu_check "${MEASURE_ARGS[@]}" --deadline-s $((left - 45)) \
  --out "$OUT" --tests "$summary"
code=$?
echo "gpu_check: tests: $summary; measurements exit $code; $((($(date +%s) - started))) s; results in $OUT"
[ "$code" = 0 ] || exit "$code"
[ "$status" = 0 ] || [ "$status" = 5 ] || exit 1  # 5: no test ran (dry mode without a GPU: all skipped is 0)
exit 0
