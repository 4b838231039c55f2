#!/usr/bin/env bash
# The GPU measurements of issues #4 (exact patterns) and #5 (linear layers), as run on 2026-11-27
# (docs/results/README.md), in calls of under ten minutes each:
#   linear:   bench_linear, our linear / recurrent methods beside cuDNN dense and flash-linear-attention
#             in the same run (fla autotunes for minutes on first use), then rat (quadratic by design);
#   patterns: bench_patterns (every pattern on the flex engine beside cuDNN and plain FlexAttention), the
#             +-256 window's backward tiles swept, a profile of its forward+backward call, and where the
#             forward's kernel time goes (mask rule, partial tiles, tiles: bench_mask_cost);
#   checks:   bench_token_moves (ways to move tokens into a grid's tiled order), 64-token blocks against
#             the defaults of then (forward), neighbourhoods with tokens given in the tiled order (no
#             moves), other backward kernels for the band (bench_band_backward; cuDNN's only with the
#             nvidia-cudnn-frontend wheel installed), every test marked gpu.
# Each step has its own budget and timeout, so a slow one cannot starve the next. Everything is
# written under WORK and packed into $OUT/issues_4_5_PART.tar.gz (the device tool brings back at most
# 8 files).
#
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=src:/tmp/site
#   bash scripts/gpu/issues_4_5.sh linear     # on one H100/H200, with .whl carried (fla, einops; the
#                                             # cuDNN frontend for checks)
#   bash scripts/gpu/issues_4_5.sh patterns
#   bash scripts/gpu/issues_4_5.sh checks
#   bash scripts/gpu/issues_4_5.sh cpu        # every step at toy sizes on a CPU (tests)
set -uo pipefail
part=${1:?usage: issues_4_5.sh linear|patterns|checks|cpu}
work=${WORK:-/tmp/issues_4_5_$part}
python=${PYTHON:-python}
mkdir -p "$work"
step() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$work/$name.log" 2>&1
  echo "   exit $? ; last lines:"; tail -4 "$work/$name.log" | sed 's/^/   /'
}
case "$part" in
linear)
  step linear 490 $python scripts/gpu/bench_linear.py --out "$work/linear" --budget-s 450 --budget 0.15 --max-call-s 1.5 \
      --methods aaren based flow lightnet lightning linear
  step linear_rat 80 $python scripts/gpu/bench_linear.py --out "$work/linear_rat" --methods rat --budget-s 50 --budget 0.15 ;;
patterns)
  step patterns 250 $python scripts/gpu/bench_patterns.py --out "$work/patterns" --budget-s 170
  step window_bwd 170 $python scripts/gpu/bench_patterns.py --out "$work/window_bwd" --cases window_256 --no-plain-flex \
      --sweep --sweep-settings bwd_m64_s1_w8 bwd_m64_s4_w8 bwd_m64_s5_w8 bwd_m32_s3_w8 bwd_m32_s4_w8 --budget-s 180
  step window_profile 80 $python scripts/gpu/profile_call.py --method sliding_window --options '{"left": 256, "right": 256}' \
      --backend flex --backward --out "$work/window_profile"
  step mask_cost 60 $python scripts/gpu/bench_mask_cost.py --out "$work/mask_cost" ;;
checks)
  step moves 80 $python scripts/gpu/bench_token_moves.py --out "$work/moves"
  step block64 120 $python scripts/gpu/bench_patterns.py --out "$work/block64" --cases window_256 window_1024 \
      neighborhood_2d neighborhood_3d --no-plain-flex --no-backward --sweep --sweep-settings block64 --budget-s 90
  step tiled_input 150 $python scripts/gpu/bench_patterns.py --out "$work/tiled_input" --cases neighborhood_2d \
      neighborhood_3d --sweep --sweep-settings tiled_input --budget-s 120
  step band_backward 60 $python scripts/gpu/bench_band_backward.py --out "$work/band_backward"
  step gpu_tests 150 $python -m pytest -q -m gpu tests/ -p no:cacheprovider ;;
cpu)
  step linear 120 $python scripts/gpu/bench_linear.py --device cpu --dtype float32 --heads 2 --dim 16 --based-dim 4 \
      --lengths 64 128 --budget 0.02 --budget-s 60 --out "$work/linear" --methods lightning linear
  step linear_rat 60 $python scripts/gpu/bench_linear.py --device cpu --dtype float32 --heads 2 --dim 16 \
      --lengths 64 128 --budget 0.02 --budget-s 30 --out "$work/linear_rat" --methods rat
  step moves 60 $python scripts/gpu/bench_token_moves.py --device cpu --tiny --out "$work/moves"
  step patterns 120 $python scripts/gpu/bench_patterns.py --device cpu --tiny --cases window_16 --no-plain-flex --no-backward \
      --sweep --sweep-settings block64 --out "$work/patterns" --budget-s 60 ;;
*) echo "unknown part '$part': linear, patterns, checks or cpu" >&2; exit 2 ;;
esac
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/issues_4_5_$part.tar.gz" -C "$work" . && echo "packed $(du -h "$OUT/issues_4_5_$part.tar.gz" | cut -f1) into \$OUT/issues_4_5_$part.tar.gz"
fi
