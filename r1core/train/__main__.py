"""Small pretraining entry: `torchrun --nproc_per_node=N -m r1core.train --tp 2 --ep 2 --steps 10`.

Same code on gloo/CPU and NCCL/GPU. Data: token shards (`--data DIR`, split over data-parallel
ranks by r1core.data) or synthetic tokens (a seeded global batch; each data-parallel rank takes
its rows). Prints one JSON line per step on rank 0 and, with --out, writes them as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import time

import torch
import torch.distributed as dist

from r1core.config_notes import field_notes
from r1core.model import presets
from r1core.parallel import ParallelConfig, init_distributed
from r1core.parallel.failfast import fail_fast
from r1core.train.engine import OptimConfig, build_engine
from r1core.train.objectives import LMObjective

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# Short names kept beside the generated ones (--sequence-parallel)
FLAG_ALIASES = {"sequence_parallel": ["--sp"]}


def add_parallel_flags(p: argparse.ArgumentParser) -> None:
    """One flag per ParallelConfig field (pp_schedule -> --pp-schedule; booleans as --x / --no-x), with
    the field's default and its comment as help: a new layout setting is a new flag without an edit here."""
    group = p.add_argument_group("parallel layout (r1core.parallel.ParallelConfig)")
    defaults, notes = ParallelConfig(), field_notes(ParallelConfig)
    for f in dataclasses.fields(ParallelConfig):
        flags = [f"--{f.name.replace('_', '-')}", *FLAG_ALIASES.get(f.name, [])]
        default = getattr(defaults, f.name)
        kw = dict(dest=f.name, help=notes.get(f.name, ""))
        if isinstance(default, bool):
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, **kw)
        elif isinstance(default, enum.Enum):
            group.add_argument(*flags, choices=[e.value for e in type(default)], default=default.value, **kw)
        else:
            group.add_argument(*flags, type=type(default), default=default, **kw)


def parallel_config(a: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(ParallelConfig)})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m r1core.train", description=__doc__.split("\n\n")[0])
    add_parallel_flags(p)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=0, help="override n_layers (0: the preset's)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="global batch in sequences")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--moe-impl", default="ref", choices=["ref", "triton", "cuda"])
    p.add_argument("--data", default="", help="token shard directory (default: synthetic tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default="", help="write a distributed checkpoint here at the end")
    p.add_argument("--out", default="", help="write the per-step metrics here as JSON (rank 0)")
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the layout for --world-size processes and print it as JSON; start nothing",
    )
    p.add_argument(
        "--world-size", type=int, default=0, help="with --check: the process count (0: $WORLD_SIZE)"
    )
    return p.parse_args(argv)


def check(a: argparse.Namespace, args, parallel: ParallelConfig) -> dict:
    """The layout a launch would use, validated without processes or GPUs (examples/distributed run this)."""
    import os

    from r1core.model import count_parameters
    from r1core.parallel import check_layout

    world = a.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    try:
        resolved = check_layout(args, parallel, world)
    except ValueError as e:
        raise SystemExit(f"--preset {a.preset} on {world} processes: {e}") from None
    total, active = count_parameters(args)
    out = {
        "preset": a.preset,
        "world_size": world,
        "tp": resolved.tp,
        "pp": resolved.pp,
        "cp": resolved.cp,
        "ep": resolved.ep,
        "dp": resolved.dp,
        "microbatches": resolved.microbatches,
        "pp_schedule": resolved.pp_schedule.value,
        "n_layers": args.n_layers,
        "params_total": total,
        "params_active": active,
        "routed_experts_per_rank": args.n_routed_experts // resolved.ep,
    }
    print(json.dumps(out), flush=True)
    return out


def synthetic_batches(vocab: int, batch: int, seq_len: int, dp_rank: int, dp_size: int, seed: int):
    """The same seeded global batch stream on every rank; each data-parallel rank keeps its rows."""
    g = torch.Generator().manual_seed(seed)
    rows = batch // dp_size
    while True:
        data = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
        mine = data[dp_rank * rows : (dp_rank + 1) * rows]
        yield {"tokens": mine[:, :-1], "labels": mine[:, 1:]}


def shard_batches(path: str, batch: int, seq_len: int, dp_rank: int, dp_size: int, seed: int):
    from r1core.data.shards import TokenShardDataset, positions_from_doc_ids

    data = TokenShardDataset(path, seq_len, seed=seed, dp_rank=dp_rank, dp_size=dp_size)
    for w in data.batches(batch // dp_size):
        yield {
            "tokens": w.tokens,
            "labels": w.labels,
            "doc_ids": w.doc_ids,
            "positions": positions_from_doc_ids(w.doc_ids),
        }


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    args = presets[a.preset]
    if a.layers:
        args = args.replace(n_layers=a.layers, n_dense_layers=min(args.n_dense_layers, a.layers))
    args = args.replace(moe_impl=a.moe_impl)
    parallel = parallel_config(a)
    if a.check:
        return [check(a, args, parallel)]
    device = init_distributed(timeout_s=parallel.timeout_s)
    with fail_fast("r1core.train"):
        return _train(a, args, parallel, device)


def _train(a: argparse.Namespace, args, parallel: ParallelConfig, device) -> list[dict]:
    optim = OptimConfig(lr=a.lr, warmup_steps=min(10, a.steps // 10), total_steps=a.steps)
    engine = build_engine(args, parallel, optim, device=device, dtype=DTYPES[a.dtype], seed=a.seed)
    if a.batch % engine.dp_size:
        raise SystemExit(f"--batch {a.batch} is not divisible by dp={engine.dp_size}")
    make = shard_batches if a.data else synthetic_batches
    source = a.data if a.data else args.vocab_size
    batches = make(source, a.batch, a.seq_len, engine.dp_rank, engine.dp_size, a.seed)
    objective, log = LMObjective(), []
    for _ in range(a.steps):
        mb = {k: v.to(device) for k, v in next(batches).items()}
        t0 = time.perf_counter()
        metrics = engine.train_step([mb], objective)
        metrics["step_s"] = time.perf_counter() - t0
        log.append(metrics)
        if engine.rank == 0:
            print(
                json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}),
                flush=True,
            )
    if a.save:
        engine.save(a.save)
    if a.out and engine.rank == 0:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "steps": log}, f, indent=1)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return log


if __name__ == "__main__":
    main()
