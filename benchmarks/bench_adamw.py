"""AdamW over the small preset's parameters: r1core's kernel (r1core.kernels.adamw) against torch's fused
AdamW (what the engine ran before) and torch's compiled foreach AdamW, in one run.

    python benchmarks/bench_adamw.py            # GPU: the small preset without MTP (1.68B parameters)
    python benchmarks/bench_adamw.py --tiny     # CPU smoke run (the kernel under TRITON_INTERPRET=1)

Three settings, each timed round-robin on the same gradients (the clip folded in with a factor of 1, so
the values do not drift):
  bf16        pure bf16 parameters and moments (bench_train's rows): torch fused AdamW, torch's foreach AdamW
              compiled (torch.compile of its step; it takes no clip factor), r1core triton (one multi-tensor
              launch per parameter group) and the same with one launch per tensor
  fp32 master bf16 model, fp32 masters (the engine's default): MasterWeights' copy in, torch fused AdamW
              on the masters, copy out; the same three with the foreach AdamW under torch.compile; r1core
              triton reading the bf16 gradients and writing the bf16 model; the same with BF16 moments
              (DeepSeek-V3's recipe)
  grad norm   the gradient norm's sum of squares over the bf16 gradients: torch's `_foreach_norm` (what the
              engine runs with torch's AdamW) against r1core's multi-tensor `sum_of_squares`
GB/s counts each provider's own traffic (bytes/param below); "× torch" is torch's time in the same
setting (fused AdamW; `_foreach_norm`) over this provider's (> 1: faster). Last line: the JSON record; a
bar chart goes beside it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Ceilings, Table, bar_plot, device, finish, out_dir, time_interleaved  # noqa: E402

from r1core.kernels.adamw import TritonAdamW  # noqa: E402
from r1core.model import presets  # noqa: E402
from r1core.model.transformer import Transformer  # noqa: E402
from r1core.parallel.optim import MasterWeights, grad_norm_sq, param_groups  # noqa: E402

# bytes moved per parameter: reads + writes of each tensor the provider touches
BYTES = {
    # p r/w, g r/w (the fused kernel stores the unscaled gradient back), m r/w, v r/w: all bf16
    ("bf16", "torch fused"): 2 * 2 + 2 * 2 + 2 * 2 + 2 * 2,
    ("bf16", "torch compiled"): 2 * 2 + 2 + 2 * 2 + 2 * 2,
    ("bf16", "triton"): 2 * 2 + 2 + 2 * 2 + 2 * 2,
    ("bf16", "triton per tensor"): 2 * 2 + 2 + 2 * 2 + 2 * 2,
    # copy in (bf16 r, fp32 w), fused on fp32 (p, g, m, v r/w), copy out (fp32 r, bf16 w)
    ("fp32 master", "torch fused"): (2 + 4) + 4 * 8 + (4 + 2),
    ("fp32 master", "torch compiled"): (2 + 4) + 8 + 4 + 8 + 8 + (4 + 2),
    ("fp32 master", "triton"): 2 + 8 + 8 + 8 + 2,  # bf16 g r, master r/w, m r/w, v r/w, bf16 model w
    ("fp32 master", "triton bf16 moments"): 2 + 8 + 4 + 4 + 2,
    ("grad norm", "torch _foreach_norm"): 2,
    ("grad norm", "triton sum_of_squares"): 2,
}


def shapes(tiny: bool) -> list[tuple[int, ...]]:
    args = presets["tiny" if tiny else "small"].replace(n_mtp_modules=0)
    with torch.device("meta"):
        model = Transformer(args)
    found = [tuple(p.shape) for p in model.parameters()]
    return found[:8] if tiny else found  # the interpreter takes seconds per tensor list


def _params(shape_list, dtype, dev, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    return [
        torch.nn.Parameter((torch.randn(s, device=dev, generator=g) * 0.02).to(dtype)) for s in shape_list
    ]


def _grads(shape_list, dev):
    g = torch.Generator(device=dev).manual_seed(1)
    return [(torch.randn(s, device=dev, generator=g) * 1e-3).to(torch.bfloat16) for s in shape_list]


def _opt(kind: str, params, **kw):
    groups = param_groups([(str(i), p) for i, p in enumerate(params)], 0.1)
    if kind == "torch fused":
        return torch.optim.AdamW(groups, lr=1e-4, fused=True, capturable=params[0].is_cuda)
    if kind == "torch compiled":
        lr = torch.tensor(1e-4, device=params[0].device)  # a tensor: no recompile when the schedule moves
        return torch.optim.AdamW(groups, lr=lr, foreach=True, capturable=True)
    return TritonAdamW(groups, lr=1e-4, multi_tensor=kind != "triton per tensor", **kw)


def bf16_setting(shape_list, dev, compiled: bool) -> dict:
    grads = _grads(shape_list, dev)
    one = torch.ones((), device=dev)
    fns = {}
    kinds = ["torch fused"] + (["torch compiled"] if compiled else []) + ["triton", "triton per tensor"]
    # one set of parameters for every provider (each has its own moments): the values drift alike for all,
    # and the master setting's four providers then fit an 80 GB card
    params = _params(shape_list, torch.bfloat16, dev, seed=0)
    for p, g in zip(params, grads):
        p.grad = g  # read-only (grad_scale 1)
    for kind in kinds:
        opt = _opt(kind, params)
        if kind == "torch compiled":
            fns[kind] = torch.compile(opt.step)
        else:
            opt.grad_scale = one
            fns[kind] = opt.step
    return fns


def master_setting(shape_list, dev, compiled: bool) -> dict:
    grads = _grads(shape_list, dev)
    one = torch.ones((), device=dev)
    fns = {}
    kinds = ["torch fused"] + (["torch compiled"] if compiled else []) + ["triton", "triton bf16 moments"]
    model = _params(shape_list, torch.bfloat16, dev, seed=0)
    for p, g in zip(model, grads):
        p.grad = g
    masters = MasterWeights([(str(j), p) for j, p in enumerate(model)])
    params = [m for _, m in masters.named]
    for kind in kinds:
        if kind.startswith("torch"):
            opt = _opt(kind, params)

            def step(opt=opt, masters=masters):
                masters.grads_in()
                opt.step()
                masters.weights_out()

            if kind == "torch compiled":  # it takes no clip factor (torch asserts grad_scale is None)
                fns[kind] = torch.compile(step)
                continue
        else:
            opt = _opt("triton", params, sources=masters.sources(), bf16_moments=kind.endswith("moments"))
            step = opt.step
        opt.grad_scale = one
        fns[kind] = step
    return fns


def norm_setting(shape_list, dev) -> dict:
    grads = _grads(shape_list, dev)
    return {
        "torch _foreach_norm": lambda: grad_norm_sq(grads, dev),
        "triton sum_of_squares": lambda: grad_norm_sq(grads, dev, triton=True),
    }


# the smallest first: compiled steps keep their tensors alive until the dynamo reset
SETTINGS = ("grad norm", "bf16", "fp32 master")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: the tiny preset's shapes, no compile")
    ap.add_argument("--no-compiled", action="store_true", help="skip torch's compiled foreach AdamW")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of the default")
    a = ap.parse_args(argv)
    chosen = [x.strip() for x in a.settings.split(",")]
    unknown = sorted(set(chosen) - set(SETTINGS))
    if unknown:  # before any work: the ceilings and the parameters take a while
        ap.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    dev = device()
    ceil = Ceilings.measure()
    shape_list = shapes(a.tiny)
    n_params = sum(torch.Size(s).numel() for s in shape_list)
    table = Table(
        f"AdamW step over {n_params / 1e9:.3f}B parameters in {len(shape_list)} tensors "
        f"(copy bandwidth {ceil.copy_gbps:,.0f} GB/s)",
        ["setting", "provider", "ms", "B/param", "GB/s", "% of copy", "× torch"],
    )
    rows = []
    settings = {  # SETTINGS' order
        "grad norm": lambda: norm_setting(shape_list, dev),
        "bf16": lambda: bf16_setting(shape_list, dev, compiled=not (a.tiny or a.no_compiled)),
        "fp32 master": lambda: master_setting(shape_list, dev, compiled=not (a.tiny or a.no_compiled)),
    }
    for setting, build in settings.items():
        if setting not in chosen:
            continue
        fns = build()
        res = time_interleaved(
            fns, warmup=1 if a.tiny else 3, repeats=1 if a.tiny else a.repeats, isolated=False
        )
        base = res[next(iter(fns))].get("ms")  # the setting's first provider: what the engine ran before
        for prov, r in res.items():
            if "error" in r:
                table.add(setting, prov, "failed: " + r["error"][:80], "", "", "", "")
                rows.append({"setting": setting, "provider": prov, **r})
                continue
            per = BYTES[(setting, prov)]
            gbps = per * n_params / r["ms"] / 1e6
            ratio = base / r["ms"] if base else float("nan")
            table.add(setting, prov, r["ms"], per, gbps, 100 * gbps / ceil.copy_gbps, ratio)
            rows.append(
                {
                    "setting": setting,
                    "provider": prov,
                    "ms": r["ms"],
                    "bytes_per_param": per,
                    "gb_s": gbps,
                    "x_torch": ratio,
                }
            )
        del fns
        torch._dynamo.reset()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    record = {"copy_gbps": ceil.copy_gbps, "n_params": n_params, "n_tensors": len(shape_list), "rows": rows}
    ok = [r for r in rows if "ms" in r]
    bar_plot(
        os.path.join(out_dir(), "bench_adamw.png"),
        f"AdamW step, {n_params / 1e9:.2f}B parameters ({record.get('device', dev.type)})",
        [f"{r['setting']}: {r['provider']}" for r in ok],
        [r["ms"] for r in ok],
        "ms per step",
    )
    finish("bench_adamw", [table], record)
    return record


if __name__ == "__main__":
    main()
