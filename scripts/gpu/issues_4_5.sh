#!/usr/bin/env bash
# The GPU measurements of issues #4 (exact patterns) and #5 (linear layers) in one call of under ten
# minutes, as run on 2026-11-27 (docs/results/README.md):
#   1. bench_linear: our linear / recurrent methods beside cuDNN dense and flash-linear-attention,
#      same run (rat, quadratic by design, last: it is the slowest);
#   2. bench_token_moves: ways to move tokens into a grid's tiled order;
#   3. bench_patterns: every pattern on the flex engine beside cuDNN and plain FlexAttention;
#   4. (GPU only) the flex tests marked gpu: gradients, and the measured defaults in effect and exact.
# Each step has its own budget and timeout, so a slow one cannot starve the next. Everything is
# written under WORK and packed into $OUT/issues_4_5.tar.gz (the device tool brings back at most 8
# files).
#
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=src:/tmp/site
#   bash scripts/gpu/issues_4_5.sh          # on one H100/H200, with .whl carried (fla, einops)
#   bash scripts/gpu/issues_4_5.sh cpu      # the same steps at toy sizes on a CPU (tests)
set -uo pipefail
device=${1:-cuda}
work=${WORK:-/tmp/issues_4_5}
python=${PYTHON:-python}
mkdir -p "$work"
step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$work/$name.log" 2>&1
  echo "   exit $? ; last lines:"; tail -4 "$work/$name.log" | sed 's/^/   /'
}
if [ "$device" = cuda ]; then
  step linear 280 $python scripts/gpu/bench_linear.py --out "$work/linear" --budget-s 240 --budget 0.15 --max-call-s 1.5 \
      --methods aaren based flow lightnet lightning linear
  step linear_rat 70 $python scripts/gpu/bench_linear.py --out "$work/linear_rat" --methods rat --budget-s 50 --budget 0.15
  step moves 80 $python scripts/gpu/bench_token_moves.py --out "$work/moves"
  step patterns 200 $python scripts/gpu/bench_patterns.py --out "$work/patterns" --budget-s 165
  step gpu_tests 120 $python -m pytest -q -m gpu tests/test_flex.py -p no:cacheprovider
else
  step linear 120 $python scripts/gpu/bench_linear.py --device cpu --dtype float32 --heads 2 --dim 16 --based-dim 4 \
      --lengths 64 128 --budget 0.02 --budget-s 60 --out "$work/linear" --methods lightning linear
  step linear_rat 60 $python scripts/gpu/bench_linear.py --device cpu --dtype float32 --heads 2 --dim 16 \
      --lengths 64 128 --budget 0.02 --budget-s 30 --out "$work/linear_rat" --methods rat
  step moves 60 $python scripts/gpu/bench_token_moves.py --device cpu --tiny --out "$work/moves"
  step patterns 120 $python scripts/gpu/bench_patterns.py --device cpu --tiny --cases window_16 --no-plain-flex --no-backward \
      --out "$work/patterns" --budget-s 60
fi
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/issues_4_5.tar.gz" -C "$work" . && echo "packed $(du -h "$OUT/issues_4_5.tar.gz" | cut -f1) into \$OUT/issues_4_5.tar.gz"
fi
