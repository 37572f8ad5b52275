"""Long sequences: the longest the small preset trains at, tokens/s per length (one GPU or context parallel).

    python benchmarks/bench_long_seq.py                # one GPU: 8K, 32K, then doubling until OOM / budget
    python benchmarks/bench_long_seq.py --seqs 65536   # one length
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_long_seq.py --seqs 65536   # CP2 (cp = world)
    python benchmarks/bench_long_seq.py --tiny         # CPU smoke run

Each row trains one sequence per step (batch 1; with cp > 1, one sequence split over the ranks) through
r1core's engine with LMObjective (fused cross-entropy, MTP, balance loss), activation checkpointing of
every block, bf16 parameters and the Triton MoE path: full optimizer steps. Attention is the model's:
SDPA's causal kernels on one GPU; under context parallelism the latent all-gather and bottom-right
causal chunks of r1core.parallel.context. Model FLOPs per token are bench_train's (causal attention
grows with T); MFU divides by the bf16 matmul peak measured in this run. The sweep stops at the first
length that runs out of memory (reported as such) or before a length whose predicted time (the last
step time scaled by the square of the length ratio) would overrun the budget; the JSON names the
longest length that trained. Writes bench_long_seq.json under $OUT (bench_long_seq_cp<N>.json under
context parallelism; a .partial.json after every length); the last line is the JSON record.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import flops_per_token  # noqa: E402
from common import Ceilings, Table, finish, out_dir, sync  # noqa: E402

from r1core.model import presets  # noqa: E402
from r1core.parallel import ParallelConfig, init_distributed  # noqa: E402
from r1core.train.engine import OptimConfig, build_engine  # noqa: E402
from r1core.train.objectives import LMObjective  # noqa: E402


def measure(args, seq: int, steps: int, device, dtype, world: int) -> dict:
    """One length: median step time over `steps` after one warm-up step; every rank runs it."""
    parallel = ParallelConfig(cp=world, activation_checkpointing=True)
    optim = OptimConfig(lr=1e-4, warmup_steps=0)
    engine = build_engine(args, parallel, optim, device=device, dtype=dtype, seed=0)
    g = torch.Generator().manual_seed(seq)
    data = torch.randint(0, args.vocab_size, (1, seq + 1), generator=g).to(device)
    mb, objective = {"tokens": data[:, :-1], "labels": data[:, 1:]}, LMObjective()
    engine.train_step([mb], objective)  # warm-up: kernels autotune, allocator grows
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], float("nan")
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = engine.train_step([mb], objective)["loss"]
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return {"seq": seq, "s_per_step": sorted(times)[len(times) // 2], "peak_gib_per_rank": peak, "loss": loss}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def sweep(args, a, device, dtype, world: int, partial: str | None) -> list[dict]:
    seqs = [int(s) for s in a.seqs.split(",")] if a.seqs else [8192, 32768]
    rows, t0 = [], time.perf_counter()
    while seqs:
        seq = seqs.pop(0)
        done = [r for r in rows if "error" not in r]
        # attention dominates at these lengths: a step costs about (T / T_last)^2 times the last one
        predicted = done[-1]["s_per_step"] * (seq / done[-1]["seq"]) ** 2 * (a.steps + 2) if done else 0.0
        if time.perf_counter() - t0 + predicted > a.budget_s:
            rows.append(
                {
                    "seq": seq,
                    "error": f"skipped: about {predicted:.3g} s more would overrun the "
                    f"{a.budget_s:g} s budget",
                }
            )
            break
        try:
            rows.append(measure(args, seq, a.steps, device, dtype, world))
        except Exception as e:  # an OOM ends the sweep (longer lengths need more); other errors are reported
            kind = "out of memory: " if _oom(e) else ""
            rows.append({"seq": seq, "error": f"{kind}{type(e).__name__}: {str(e)[:200]}"})
            _free()
            break
        _free()
        if partial:
            with open(partial, "w") as f:  # survives a killed run
                json.dump(rows, f, indent=1)
        if not a.seqs and not seqs and seq < a.max_seq:
            seqs.append(2 * seq)  # default sweep: keep doubling past 32K
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--seqs", default="", help="comma-separated lengths (default: 8192, 32768, then doubling)")
    p.add_argument("--max-seq", type=int, default=1 << 20, help="the default sweep stops doubling here")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=300.0, help="start no new length after this long")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run (tiny preset, fp32, short lengths)")
    a = p.parse_args(argv)
    if a.tiny:
        a.preset, a.seqs, a.steps = "tiny", a.seqs or "32,64", 1
    device = init_distributed()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = presets[a.preset].replace(moe_impl="triton" if device.type == "cuda" else "ref")
    peak = Ceilings.measure().matmul_tflops
    name = "bench_long_seq" if world == 1 else f"bench_long_seq_cp{world}"
    partial = os.path.join(out_dir(), f"{name}.partial.json") if rank0 else None
    rows = sweep(args, a, device, dtype, world, partial)
    table = Table(
        f"train step, {a.preset} preset, one sequence per step, activation checkpointing, "
        f"cp={world}, {dtype}",
        ["seq", "s/step", "tokens/s", "model TFLOP/s per GPU", "MFU %", "peak GiB/rank", "loss"],
    )
    for r in rows:
        if "error" in r:
            table.add(r["seq"], r["error"][:100], "", "", "", "", "")
            continue
        r["tokens_s"] = r["seq"] / r["s_per_step"]
        r["model_tflops_per_gpu"] = flops_per_token(args, r["seq"]) * r["tokens_s"] / world / 1e12
        r["mfu"] = r["model_tflops_per_gpu"] / peak
        table.add(
            r["seq"],
            r["s_per_step"],
            r["tokens_s"],
            r["model_tflops_per_gpu"],
            100 * r["mfu"],
            r["peak_gib_per_rank"],
            r["loss"],
        )
    trained = [r["seq"] for r in rows if "error" not in r]
    record = {
        "preset": a.preset,
        "cp": world,
        "matmul_peak_tflops": peak,
        "rows": rows,
        "longest_trained": max(trained) if trained else None,
    }
    if rank0:
        finish(name, [table], record)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return record


if __name__ == "__main__":
    main()
