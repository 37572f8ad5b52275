"""Find where a non-finite loss or gradient first appears in pretraining (a diagnostic for GPU runs).

    python benchmarks/nan_probe.py --prepared RUN/stages/prepare --model small --impl triton --steps 120

Trains like the pipeline's pretrain stage. At the first step the engine skips for a non-finite
gradient norm it replays that micro-batch with forward hooks on every module and prints the first
module whose output (or whose input gradient, in backward) is non-finite, then the per-part losses.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch


def _first_nonfinite(model, run):
    """Run `run()` with hooks; return (phase, module name, detail) of the first non-finite tensor."""
    found: list = []

    def bad(t):
        return torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()

    def fwd_hook(name):
        def hook(mod, inputs, out):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if not found and any(bad(o) for o in outs):
                ins_bad = any(bad(i) for i in inputs)
                found.append(
                    (
                        "forward",
                        name,
                        (
                            f"inputs finite={not ins_bad}, "
                            f"out dtypes={[getattr(o, 'dtype', None) for o in outs]}"
                        ),
                    )
                )

        return hook

    def bwd_hook(name):
        def hook(mod, grad_in, grad_out):
            if not found and any(bad(g) for g in grad_in if g is not None):
                gout_bad = any(bad(g) for g in grad_out if g is not None)
                found.append(("backward", name, f"grad_output finite={not gout_bad}"))

        return hook

    handles = []
    for name, mod in model.named_modules():
        handles.append(mod.register_forward_hook(fwd_hook(name)))
        handles.append(mod.register_full_backward_hook(bwd_hook(name)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def main() -> None:
    from r1core.data.shards import TokenShardDataset
    from r1core.model import presets
    from r1core.parallel import ParallelConfig
    from r1core.train.engine import OptimConfig, build_engine
    from r1core.train.lm import WindowBatches
    from r1core.train.objectives import LMObjective

    p = argparse.ArgumentParser()
    p.add_argument("--prepared", required=True)
    p.add_argument("--model", default="small")
    p.add_argument("--impl", default="triton")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    args = presets[a.model].replace(moe_impl=a.impl)
    optim = OptimConfig(lr=a.lr, warmup_steps=a.warmup, total_steps=a.steps * 2, max_nonfinite_steps=10**9)
    engine = build_engine(args, ParallelConfig(), optim, device=dev, dtype=dtype, seed=0)
    prepared = Path(a.prepared)
    ds = TokenShardDataset(str(prepared / "shards"), a.seq, seed=0)
    it = iter(WindowBatches(ds, a.batch))
    obj = LMObjective()
    t0 = time.perf_counter()
    for step in range(1, a.steps + 1):
        mb = next(it)
        m = engine.train_step([mb], obj)
        if step % 10 == 0 or m.get("skipped_nonfinite"):
            print(
                json.dumps(
                    {
                        "step": step,
                        **{
                            k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
                            for k, v in m.items()
                            if k in ("loss", "ce", "mtp", "aux", "grad_norm", "skipped_nonfinite")
                        },
                        "s": round(time.perf_counter() - t0, 1),
                    }
                ),
                flush=True,
            )
        if m.get("skipped_nonfinite"):

            def replay():
                from r1core.train.engine import _on_device

                d = _on_device(mb, engine.device)
                engine._zero_grad()
                h, aux = engine.model.hidden_states(d["tokens"], d.get("positions"), d.get("doc_ids"))
                denoms = engine._totals(obj, [d])
                loss, parts = obj(h, engine.model.head.weight, None, d, engine.model, denoms=denoms)
                print("replay parts:", {k: float(v) for k, v in parts.items()}, "aux", float(aux), flush=True)
                (loss + aux).backward()

            print("first non-finite:", _first_nonfinite(engine.model, replay), flush=True)
            w_bad = [n for n, t in engine.model.named_parameters() if not torch.isfinite(t).all()]
            print("non-finite weights:", w_bad[:5], flush=True)
            break


if __name__ == "__main__":
    main()
