#!/usr/bin/env bash
# Run the kernel and system microbenchmarks; each writes <bench>.json (+ a PNG) under $OUT and prints
# its table, then one JSON line.
#
#   bash examples/benchmarks/run.sh                          # all four on the GPU (minutes each)
#   BENCHES="bench_moe" bash examples/benchmarks/run.sh --shapes v3
#   TINY=1 bash examples/benchmarks/run.sh                   # CPU smoke run at tiny shapes
#   python examples/benchmarks/summarize.py benchmarks/out   # one line per provider from the JSON
#
# Settings (environment): BENCHES (default: bench_moe bench_grpo_loss bench_rollout bench_train),
# TINY=1 (pass --tiny), OUT (output folder, default benchmarks/out). Other arguments go to each bench.
set -euo pipefail
cd "$(dirname "$0")/../.."
BENCHES=${BENCHES:-"bench_moe bench_grpo_loss bench_rollout bench_train"}
export R1CORE_BENCH_OUT=${OUT:-benchmarks/out}
for bench in $BENCHES; do
  echo "== $bench"
  python "benchmarks/$bench.py" ${TINY:+--tiny} "$@"
done
echo "results: $R1CORE_BENCH_OUT"
