"""A 2-rank job that fails on one rank, for tests/test_parallel.py (run under torchrun, gloo).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_fail_fast_job.py stage
    ... tests/dist_fail_fast_job.py timeout

stage:   PP2 DualPipeV on the tiny preset; rank 0's first layer raises on its third call, mid-schedule,
         while rank 1 waits for its activations. The process-group timeout is 600 s: only fail_fast can
         end the job in seconds.
timeout: rank 0 hangs without raising (a stuck kernel, a lost peer); rank 1's barrier times out after
         parallel.timeout_s = 3 s, raises, and fail_fast ends the job.
"""

from __future__ import annotations

import sys
import time

import torch

from r1core.model import presets
from r1core.parallel import ParallelConfig, init_distributed
from r1core.parallel.failfast import fail_fast


def failing_stage() -> None:
    from r1core.train.engine import OptimConfig, build_engine
    from r1core.train.objectives import LMObjective

    cfg = ParallelConfig(pp=2, pp_schedule="dualpipev", microbatches=4, timeout_s=600)
    device = init_distributed("cpu", cfg.timeout_s)
    engine = build_engine(presets["tiny"], cfg, OptimConfig(warmup_steps=0, total_steps=10), device=device)
    if engine.rank == 0:
        block = engine.model.layers["0"]
        calls = {"n": 0}
        forward = block.forward

        def broken(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("deliberate failure in stage 0")
            return forward(*args, **kwargs)

        block.forward = broken
    tokens = torch.randint(0, 512, (4, 17), generator=torch.Generator().manual_seed(0))
    with fail_fast("dist_fail_fast_job"):
        engine.train_step([{"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}], LMObjective())


def hung_peer() -> None:
    import torch.distributed as dist

    init_distributed("cpu", timeout_s=3)
    with fail_fast("dist_fail_fast_job"):
        if dist.get_rank() == 0:
            time.sleep(600)
        dist.barrier()


if __name__ == "__main__":
    {"stage": failing_stage, "timeout": hung_peer}[sys.argv[1]]()
