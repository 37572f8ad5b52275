#!/usr/bin/env bash
# r1core.parallel on NCCL, for a two-GPU machine (nvidia-h100-x2 / nvidia-h200-x2), at most 17 minutes (timeouts),
# about 8 expected:
#   1. benchmarks/check_parallel_nccl.py, one launch per layout: EP2, PP2 1F1B / DualPipeV, TP2+SP, DP2 (ZeRO-1),
#      TP2, CP2 in fp32 and TP2 / EP2 / CP2 in bf16 with the Triton MoE path, each against the single-GPU run
#      of the same 20 steps (small preset cut to 4 layers): loss and gradient norm of every step within
#      tolerance, median step times of both; prints which pipeline schedules this torch has.
#   2. a `torchrun -m r1core.train` smoke run (TP2+SP) on the small preset in bf16.
#   3. issue 18: the small preset at 64K tokens on one GPU, then CP2 on two (benchmarks/bench_long_seq.py,
#      batch 1, activation checkpointing): tokens/s and peak memory per rank side by side.
# Run from the repo root with the carried wheels in .whl/ (../shared/tools/device-wheels.sh):
#   bash benchmarks/run_nccl_2gpu.sh
# Logs and JSON go to $OUT. NVLink multicast stays off (KINDS.md): NCCL_NVLS_ENABLE=0 and friends.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/* > "$OUT/wheels.log" 2>&1 || tail -5 "$OUT/wheels.log"
R1CORE_BUILD_CUDA=0 python3 -m pip install -q -e . --no-deps --no-build-isolation > "$OUT/install.log" 2>&1 \
  || tail -5 "$OUT/install.log"
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"

# One launch per layout, 20 steps each (about 30 s): a layout that fails ends its own launch with an error
# (r1core.parallel.failfast) and cannot hide the others. Issue 17's rows first.
for layout in ep2 pp2_1f1b pp2_dualpipev tp2_sp dp2_zero1 tp2 cp2 tp2_bf16_triton ep2_bf16_triton cp2_bf16_triton; do
  timeout 75 python3 -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/check_parallel_nccl.py \
    --layouts "$layout" --steps 20 --out "$OUT/nccl_2gpu_$layout.json" > "$OUT/nccl_2gpu_$layout.log" 2>&1
  echo "check_parallel_nccl $layout rc=$?"
  grep -E "^torch |OK|MISMATCH" "$OUT/nccl_2gpu_$layout.log" || grep -E "failed|Error" "$OUT/nccl_2gpu_$layout.log" | head -5
done

timeout 100 python3 -m torch.distributed.run --standalone --nproc_per_node=2 -m r1core.train --tp 2 --sp --preset small --layers 4 \
  --seq-len 2048 --batch 8 --steps 5 --dtype bf16 --moe-impl triton --out "$OUT/train_tp2_sp.json" \
  > "$OUT/train_tp2_sp.log" 2>&1
echo "train_tp2_sp rc=$?"
tail -2 "$OUT/train_tp2_sp.log"

timeout 100 python3 benchmarks/bench_long_seq.py --seqs 65536 --steps 2 > "$OUT/long_seq_64k_1gpu.log" 2>&1
echo "long_seq 64K one GPU rc=$?"
timeout 120 python3 -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/bench_long_seq.py --seqs 65536 \
  --steps 2 > "$OUT/long_seq_64k_cp2.log" 2>&1
echo "long_seq 64K CP2 rc=$?"
grep -hE "^## |^\| 65536" "$OUT/long_seq_64k_1gpu.log" "$OUT/long_seq_64k_cp2.log"
