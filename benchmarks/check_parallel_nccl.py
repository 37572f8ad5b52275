"""NCCL check for r1core.parallel on one host: each layout's losses against the single-GPU run.

    torchrun --standalone --nproc_per_node=2 benchmarks/check_parallel_nccl.py --out $OUT/nccl_2gpu.json

Small preset cut to --layers layers. Every rank first trains the single-GPU reference (LocalEngine,
whole batch) on its own GPU, then each layout (TP2, EP2, DP2 with ZeRO-1, TP2+SP, PP2 1F1B /
DualPipeV, CP2) trains the same --steps (20) on the same global batch. Losses and gradient norms
of every step, fp32 with TF32 off, must agree to rtol 1e-4; the bf16 rows use the Triton MoE path
and must agree to 2e-2 (bf16 rounding of reordered sums). Median step times of both runs are
printed. Prints a table and which torch.distributed.pipelining schedules this torch has; rank 0
writes the JSON; exits 1 on any mismatch. A layout that raises ends the launch with an error on
every rank (r1core.parallel.failfast): run_nccl_2gpu.sh launches each layout on its own.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

from r1core.model import presets
from r1core.parallel import ParallelConfig, init_distributed
from r1core.parallel.failfast import fail_fast
from r1core.parallel.pipeline import SCHEDULES
from r1core.train.engine import LocalEngine, OptimConfig, build_engine
from r1core.train.objectives import LMObjective

LAYOUTS = {  # name: (ParallelConfig kwargs, dtype, MoE impl)
    "tp2": (dict(tp=2), torch.float32, "ref"),
    "ep2": (dict(ep=2), torch.float32, "ref"),
    "dp2_zero1": (dict(), torch.float32, "ref"),
    "tp2_sp": (dict(tp=2, sequence_parallel=True), torch.float32, "ref"),
    "pp2_1f1b": (dict(pp=2, microbatches=2), torch.float32, "ref"),
    "pp2_dualpipev": (dict(pp=2, pp_schedule="dualpipev", microbatches=4), torch.float32, "ref"),
    "cp2": (dict(cp=2), torch.float32, "ref"),
    "tp2_bf16_triton": (dict(tp=2), torch.bfloat16, "triton"),
    "ep2_bf16_triton": (dict(ep=2), torch.bfloat16, "triton"),
    "cp2_bf16_triton": (dict(cp=2), torch.bfloat16, "triton"),
}
RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def batch(args, rows: int, seq: int, device) -> dict:
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, args.vocab_size, (rows, seq + 1), generator=g).to(device)
    return {"tokens": data[:, :-1], "labels": data[:, 1:]}


def run(engine, mb: dict, steps: int) -> tuple[list[float], list[float], float]:
    """Losses and gradient norms per step, and the median step time (each step ends in a host sync)."""
    rows = mb["tokens"].shape[0] // engine.dp_size
    mine = {k: v[engine.dp_rank * rows : (engine.dp_rank + 1) * rows] for k, v in mb.items()}
    losses, norms, times = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        m = engine.train_step([mine], LMObjective())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
    return losses, norms, statistics.median(times)


def worst_rel(got: list[float], want: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(got, want))


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--timeout", type=float, default=180.0, help="process-group timeout (s)")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--out", default="")
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = init_distributed(timeout_s=a.timeout)
    base = presets[a.preset].replace(n_layers=a.layers, n_dense_layers=1)
    optim = OptimConfig(lr=1e-4, warmup_steps=0, total_steps=100)
    mb = batch(base, a.rows, a.seq, device)
    refs, rows, ok = {}, [], True
    for name in a.layouts.split(","):
        cfg, dtype, impl = LAYOUTS[name]
        args = base.replace(moe_impl=impl)
        if (dtype, impl) not in refs:
            refs[(dtype, impl)] = run(
                LocalEngine(args, ParallelConfig(), optim, device, dtype, 0), mb, a.steps
            )
            free()
        ref_losses, ref_norms, ref_step = refs[(dtype, impl)]
        row = {
            "layout": name,
            "dtype": str(dtype),
            "moe_impl": impl,
            "ref_losses": ref_losses,
            "ref_grad_norms": ref_norms,
            "ref_step_s": ref_step,
        }
        # a failing layout ends the launch on every rank (no hang); run_nccl_2gpu.sh launches each on its own
        with fail_fast(f"check_parallel_nccl {name}"):
            engine = build_engine(args, ParallelConfig(**cfg), optim, device=device, dtype=dtype, seed=0)
            row["losses"], row["grad_norms"], row["step_s"] = run(engine, mb, a.steps)
        del engine
        free()
        row.update(
            max_rel_diff=worst_rel(row["losses"], ref_losses),
            max_rel_diff_grad_norm=worst_rel(row["grad_norms"], ref_norms),
        )
        row["ok"] = max(row["max_rel_diff"], row["max_rel_diff_grad_norm"]) <= RTOL[dtype]
        ok &= row["ok"]
        rows.append(row)
    import torch.distributed.pipelining as pipelining

    have = {s.value: hasattr(pipelining, cls) for s, cls in SCHEDULES.items()}
    if dist.get_rank() == 0:
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(f"torch {torch.__version__}, {gpu} x{dist.get_world_size()}, schedules available: {have}")
        for r in rows:
            print(
                f"{r['layout']:18s} {r['dtype']:15s} {a.steps} steps: last loss {r['losses'][-1]:.5f} "
                f"(1 GPU {r['ref_losses'][-1]:.5f}), max rel diff loss {r['max_rel_diff']:.2e} "
                f"grad norm {r['max_rel_diff_grad_norm']:.2e}; median step {r['step_s'] * 1e3:.0f} ms "
                f"(1 GPU {r['ref_step_s'] * 1e3:.0f} ms) {'OK' if r['ok'] else 'MISMATCH'}"
            )
        record = {
            "torch": torch.__version__,
            "device": gpu,
            "schedules": have,
            "layers": a.layers,
            "seq": a.seq,
            "rows": rows,
            "ok": ok,
        }
        if a.out:
            with open(a.out, "w") as f:
                json.dump(record, f, indent=1)
        print(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
