#!/usr/bin/env bash
# The GPU measurements still open after the 2026-11-27 session, in one call of under ten minutes:
#   1. bench_linear: our linear methods (after the chunked-scan backward fix) beside cuDNN dense and
#      flash-linear-attention, in the same run (issue #5);
#   2. bench_dynamic for the per-query methods, with the varlen engine timed beside flex (varlen_ms);
#   3. bench_patterns --sweep: flex settings per pattern (issue #4).
# Each step has its own budget and timeout, so a slow one cannot starve the next. Everything is
# written under WORK and packed into $OUT/pending.tar.gz (the device tool brings back at most 8 files;
# run 2 of bench_linear lost its outputs to that limit).
#
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=src:/tmp/site
#   bash scripts/gpu/pending.sh            # on one H100/H200, with .whl carried (fla, einops)
#   bash scripts/gpu/pending.sh cpu        # the same steps at toy sizes on a CPU (tests)
set -uo pipefail
device=${1:-cuda}
work=${WORK:-/tmp/pending}
python=${PYTHON:-python}
mkdir -p "$work"
step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$work/$name.log" 2>&1
  echo "   exit $? ; last lines:"; tail -4 "$work/$name.log" | sed 's/^/   /'
}
if [ "$device" = cuda ]; then
  step linear 270 $python scripts/gpu/bench_linear.py --out "$work/linear" --budget-s 220 --budget 0.15 --max-call-s 1.5
  step dynamic 150 $python scripts/gpu/bench_dynamic.py --out "$work/dynamic" --methods moba,vmoba,kinetics --budget-s 120
  step patterns 130 $python scripts/gpu/bench_patterns.py --out "$work/patterns" --no-plain-flex --sweep --budget-s 100
else
  step linear 120 $python scripts/gpu/bench_linear.py --device cpu --dtype float32 --heads 2 --dim 16 --based-dim 4 \
      --lengths 64 128 --budget 0.02 --budget-s 60 --out "$work/linear"
  step dynamic 120 $python scripts/gpu/bench_dynamic.py --device cpu --dtype float32 --out "$work/dynamic" \
      --methods moba --length 512 --heads 2 --dim 16 --densities 0.25 --reps 1 --recall-rows 16 --budget-s 60
  step patterns 120 $python scripts/gpu/bench_patterns.py --device cpu --tiny --cases window_16 --no-plain-flex --no-backward \
      --out "$work/patterns" --budget-s 60
fi
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/pending.tar.gz" -C "$work" . && echo "packed $(du -h "$OUT/pending.tar.gz" | cut -f1) into \$OUT/pending.tar.gz"
fi
