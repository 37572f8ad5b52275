#!/usr/bin/env bash
# Pretraining on one node with a TP x PP x EP x DP layout: torchrun, one process per GPU.
#
#   bash examples/distributed/train_node.sh --steps 1000 --data shards/    # v2_lite: tp2 x ep4 x dp4
#   PRESET=v3 bash examples/distributed/train_node.sh --steps 20           # v3 width, 4 layers: tp1 x ep8 x dp8
#   CHECK=1 PRESET=v3 bash examples/distributed/train_node.sh              # validate the layout, no GPU needed
#
# Settings (environment): PRESET (v2_lite | v3 | any r1core preset), NPROC (processes, default 8),
# LAYOUT (parallel flags; default per preset below), DTYPE (bf16 | fp32), CHECK=1 (validate only),
# DRY_RUN=1 (print the command instead).
# Other arguments go to `python -m r1core.train` (--steps, --batch, --seq-len, --data, --save, --out, ...).
set -euo pipefail
# DRY_RUN=1 prints the command instead of running it
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

PRESET=${PRESET:-v2_lite}
NPROC=${NPROC:-8}
DTYPE=${DTYPE:-bf16}
case "$PRESET" in
  # DeepSeek-V2-Lite (15.7B total, 2.4B active): 16 heads and 64 experts; experts split over 4 ranks
  v2_lite) DEFAULT_LAYOUT="--tp 2 --ep 4" ;;
  # DeepSeek-V3 (671B) does not train on one node; this runs its full width with 4 layers (1 MoE layer,
  # 32 of 256 experts per GPU) to rehearse the layout and measure a layer's step time
  v3) DEFAULT_LAYOUT="--tp 1 --ep 8 --layers 4" ;;
  *) DEFAULT_LAYOUT="" ;;
esac
read -r -a LAYOUT_ARGS <<< "${LAYOUT:-$DEFAULT_LAYOUT}"

if [[ "${CHECK:-0}" == 1 ]]; then
  run python -m r1core.train --check --world-size "$NPROC" --preset "$PRESET" "${LAYOUT_ARGS[@]}" "$@"
  exit
fi
run torchrun --standalone --nproc_per_node="$NPROC" -m r1core.train \
  --preset "$PRESET" "${LAYOUT_ARGS[@]}" --dtype "$DTYPE" "$@"
