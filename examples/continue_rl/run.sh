#!/usr/bin/env bash
# Continue from a pretrained checkpoint: R1-Zero (GRPO with rule rewards) on your JSONL, then the report.
#
#   bash examples/continue_rl/run.sh /path/to/hf_checkpoint                 # the sample data in examples/data
#   TRAIN=train.jsonl TEST=test.jsonl bash examples/continue_rl/run.sh /path/to/hf_checkpoint rl.steps=200
#
# The checkpoint is any HF DeepSeek-V3 / V2 directory with a tokenizer.json: a model stage of an earlier
# `r1core run` (runs/<run>/stages/pretrain/model), a transformers save_pretrained, or released weights.
# Settings (environment): TRAIN, TEST (problems JSONL, see docs/data.md), RUN_DIR (default
# runs/continue-rl), DRY_RUN=1 (print the command). Other arguments are `r1core run` overrides.
set -euo pipefail
# DRY_RUN=1 prints the command instead of running it
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
CKPT=${1:?usage: run.sh /path/to/hf_checkpoint [r1core run overrides...]}
shift
HERE=$(cd "$(dirname "$0")/.." && pwd)
TRAIN=${TRAIN:-$HERE/data/train.jsonl}
TEST=${TEST:-$HERE/data/test.jsonl}
RUN_DIR=${RUN_DIR:-runs/continue-rl}
run r1core run pipeline=r1_zero hf_checkpoint="$CKPT" data.rl_prompts_jsonl="$TRAIN" data.eval_jsonl="$TEST" \
  run_dir="$RUN_DIR" hydra.run.dir="$RUN_DIR" "$@"
[[ "${DRY_RUN:-0}" == 1 ]] || echo "report: $RUN_DIR/report.md"
