#!/usr/bin/env bash
# The `full` benchmark preset (one GPU, ~45 methods), one piece per call: each call continues the run
# stored in OUT (or starts it) and stops cleanly before PIECE_SECONDS, so every call fits a
# 10-minute command limit. Exit code 3 = unfinished: call again with the same OUT (carry OUT's
# results.sqlite between machines; it is small). Exit code 0 = finished; OUT/report.html written.
#
#   bash scripts/gpu/bench_full.sh OUT                    # on the GPU machine, repeat while it exits 3
#   bash scripts/gpu/bench_full.sh OUT tiny cpu           # the same code paths on a CPU in seconds (tests)
#
# Extra arguments after the third go to `attnkit bench` (e.g. --tiers K1,K2 --methods dense,moba).
# If $OUT (the device tool's output folder) is set, the store and report (PNGs in plots.tar) are copied there
# after each call.
set -uo pipefail
out=${1:?usage: bench_full.sh OUT [PRESET=full] [DEVICE=cuda] [attnkit bench options...]}
preset=${2:-full}
device=${3:-cuda}
shift $(( $# < 3 ? $# : 3 ))
piece=${PIECE_SECONDS:-540}
python=${PYTHON:-python}
resume=()
[ -f "$out/results.sqlite" ] && resume=(--resume)
$python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
$python -m attnkit.cli bench --preset "$preset" --device "$device" --out "$out" "${resume[@]}" \
    --time-limit "$piece" "$@"
code=$?
if [ -n "${OUT:-}" ] && [ -d "$out" ]; then
  # the device tool brings back at most 8 files: the store, the report, the summary and one tar of the PNGs
  mkdir -p "$OUT/bench" && cp "$out"/results.sqlite "$out"/*.html "$out"/*.md "$OUT/bench/" 2>/dev/null
  (cd "$out" && ls *.png >/dev/null 2>&1 && tar -cf "$OUT/bench/plots.tar" *.png)
fi
case $code in
  0) echo "bench_full: finished; report in $out/report.html" ;;
  3) echo "bench_full: unfinished (time limit); run the same command again to continue" ;;
  *) echo "bench_full: attnkit bench exited with $code" ;;
esac
exit $code
