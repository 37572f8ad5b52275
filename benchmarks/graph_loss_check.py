"""Does the whole-step CUDA graph (parallel.cuda_graph) train like the ordinary step? Both from the same
initialisation on the same batch (bench_train's setup: small preset, B4 x T2048, bf16, compiled, MTP off),
for --steps optimizer steps each; prints both loss curves and their largest relative difference.

    python benchmarks/graph_loss_check.py --steps 8      # GPU

The graph row's first two steps are ordinary ones (its warm-up), the third is captured and replayed. Pure
bf16 parameters round differently from run to run, so the curves agree closely, not bit for bit (the GPU
test with fp32 master weights, test_cuda_graph_step_replays_the_graph_ready_step_gpu, is the tight check).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402

from r1core.model import presets  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--variants", default="compile_graph_nomtp,compile_nomtp")
    a = p.parse_args(argv)
    curves = {}
    for name in a.variants.split(","):
        step, losses, engine = bench_train.r1core_step(
            presets["small"], name, 4, 2048, torch.device("cuda"), torch.bfloat16
        )
        for _ in range(a.steps):
            step()
        curves[name] = list(losses)
        print(name, [round(x, 4) for x in losses], flush=True)
        step = engine = None  # noqa: F841  (drops this row's model before the next is built)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    first, second = curves.values()
    diff = max(abs(x - y) / abs(y) for x, y in zip(first, second))
    print(f"largest relative difference over {a.steps} steps: {diff:.4f}")
    return {"curves": curves, "max_rel_diff": diff}


if __name__ == "__main__":
    main()
