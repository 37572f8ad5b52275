"""Where the MoE kernels' time goes at DeepSeek-V3 shapes: a per-kernel breakdown for bench_moe's misses.

    python benchmarks/moe_probe.py [--skip-dispatch] [--skip-gemms] [--zipf 1.0] [--layer]

Prints, for the permute and unpermute providers, each CUDA kernel's share of one call (torch.profiler),
and for the expert FFN the time and TFLOP/s of every grouped GEMM of the forward and backward, with
gate/up as two [E, I, D] weights and as one stacked [E, 2I, D] weight, and both orientations of the
K-grouped weight-gradient GEMM. A diagnostic, not a benchmark: bench_moe.py holds the goals.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Ceilings, time_ms  # noqa: E402

from r1core.model import presets  # noqa: E402
from r1core.model.moe import RouterSpec, route_ref  # noqa: E402


def kernel_table(fn, label: str, calls: int = 5, detail: bool = False) -> None:
    """Per-kernel GPU time of fn (torch.profiler); `detail` also lists the last call's kernels in launch
    order."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [
        (ev.name, getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0))
        for ev in prof.events()
        if ev.device_type == torch.autograd.DeviceType.CUDA
    ]
    rows = {}
    for name, t in events:
        rows.setdefault(name[:90], [0, 0.0])
        rows[name[:90]][0] += 1
        rows[name[:90]][1] += t
    total = sum(v[1] for v in rows.values()) / calls
    before = torch.cuda.memory_stats()
    wall = time_ms(fn)
    after = torch.cuda.memory_stats()
    churn = {
        k: after.get(k, 0) - before.get(k, 0)
        for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")
    }
    print(
        f"\n[{label}] GPU time per call {total / 1e3:.3f} ms (kernel sum), wall {wall:.3f} ms; "
        f"allocator over 13 timed calls: {churn}"
    )
    for name, (n, t) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        print(f"  {t / calls / 1e3:8.4f} ms  x{n // calls:<3d} {name}")
    if detail:
        for name, t in events[-(len(events) // calls) :]:
            if t > 30:  # us
                print(f"    {t / 1e3:8.3f} ms  {name[:60]}...{name[-40:]}")


def dispatch(T, args, x, ceil):
    from r1core.kernels import moe_cuda
    from r1core.kernels.moe_permute import moe_permute, moe_unpermute

    E, K, D = args.n_routed_experts, args.n_activated_experts, args.dim
    gate_w = torch.randn(E, D, device=x.device, dtype=x.dtype) * 0.02
    spec = RouterSpec.from_args(args)
    w, idx, counts = route_ref(torch.nn.functional.linear(x, gate_w).float(), None, spec)
    nbytes = (T + T * K) * D * x.element_size()
    bound = nbytes / ceil.copy_gbps / 1e6
    print(
        f"\npermute/unpermute bytes {nbytes / 1e9:.3f} GB; "
        f"at the measured copy BW {ceil.copy_gbps:.0f} GB/s: "
        f"{bound:.3f} ms; 80% goal: {bound / 0.8:.3f} ms"
    )
    src = idx.flatten().argsort(stable=True) // K
    kernel_table(lambda: x.index_select(0, src), "index_select gather (same bytes, no index work)")
    y = torch.randn(T * K, D, device=x.device, dtype=x.dtype)
    yg, wg, g = y.clone().requires_grad_(), w.clone().requires_grad_(), torch.randn_like(x)
    _, pos = moe_permute(x, idx, counts)
    kernel_table(
        lambda: torch.autograd.grad(moe_unpermute(yg, pos, wg), (yg, wg), g), "unpermute fwd+bwd triton"
    )
    if moe_cuda.is_built():
        kernel_table(
            lambda: torch.autograd.grad(moe_cuda.moe_unpermute_cuda(yg, pos, wg), (yg, wg), g),
            "unpermute fwd+bwd cuda",
        )
    with torch.no_grad():
        kernel_table(lambda: moe_permute(x, idx, counts), "permute triton")
        kernel_table(lambda: moe_unpermute(y, pos, w), "unpermute triton")
        if moe_cuda.is_built():
            kernel_table(lambda: moe_cuda.moe_permute_cuda(x, idx, counts), "permute cuda")
            kernel_table(lambda: moe_cuda.moe_unpermute_cuda(y, pos, w), "unpermute cuda")


# r1core's persistent TMA weight-gradient kernel at its default tiles and a few others; "masked tail" takes
# each expert's partial last block by masked loads rather than one masked TMA block
TMA_TILES = {
    "default": {},  # 128 x 256, BK 64, 3 stages, 8 warps, TMA tail
    "masked tail": dict(TMA_TAIL=False),
    "128x128 s4": dict(BLOCK_N=128, num_stages=4),
    "128x256 bk32 s5": dict(BLOCK_K=32, num_stages=5),
}


def tma_wgrad_cases(seg, x, dy, h, h2, f1, tags):
    from r1core.kernels.grouped_swiglu import _configs, _Segments, _wgrad_tma

    cfg = _configs(x)
    segs = _Segments(seg, cfg["rows"]["BLOCK_M"])
    gmm = torch._grouped_mm
    E = seg.numel()
    pick = torch.tensor(sorted({0, 1, E // 2, E - 1}), device=x.device)  # compare a few experts: 15 GB each
    for name, a, b, names in (("dw13", h2, x, tags), ("dw2", dy, h, ["default"])):
        ref = gmm(a.t(), b, offs=segs.offs)[pick].float()
        for tag in names:
            try:
                ours = _wgrad_tma(a, b, segs, cfg, x.dtype, **TMA_TILES[tag])[pick].float()
                err = ((ours - ref).abs().max() / ref.abs().max()).item()
                print(f"  TMA {tag} {name}: rel. max error vs CUTLASS {err:.3g}, experts {pick.tolist()}")
            except Exception as exc:
                print(f"  TMA {tag} {name} failed: {type(exc).__name__}: {str(exc)[:300]}")
        del ref
    cases = {}
    for tag in tags:
        cases[f"wgrad dw13 [E,2I,D] ours TMA {tag}"] = (
            lambda t=TMA_TILES[tag]: _wgrad_tma(h2, x, segs, cfg, x.dtype, **t),
            2 * f1,
        )
    cases["wgrad dw2 [E,D,I] ours TMA default"] = (lambda: _wgrad_tma(dy, h, segs, cfg, x.dtype), f1)
    return cases


def gemms(T, args, dev, ceil, zipf, tma_tags):
    from bench_moe import segments

    E, K, D, I = args.n_routed_experts, args.n_activated_experts, args.dim, args.moe_inter_dim
    P = T * K
    seg = torch.tensor(segments(P, E, zipf), device=dev)
    offs = torch.cumsum(seg, 0, dtype=torch.int32)
    bf = dict(device=dev, dtype=torch.bfloat16)
    x, dy = torch.randn(P, D, **bf), torch.randn(P, D, **bf)
    h, h2 = torch.randn(P, I, **bf), torch.randn(P, 2 * I, **bf)
    w1, w13, w2 = torch.randn(E, I, D, **bf), torch.randn(E, 2 * I, D, **bf), torch.randn(E, D, I, **bf)
    gmm = torch._grouped_mm
    f1 = 2.0 * P * D * I
    cases = {
        "fwd gate (N=I)           x @ w1^T": (lambda: gmm(x, w1.transpose(1, 2), offs=offs), f1),
        "fwd gate+up (N=2I)       x @ w13^T": (lambda: gmm(x, w13.transpose(1, 2), offs=offs), 2 * f1),
        "fwd down (N=D, K=I)      a @ w2^T": (lambda: gmm(h, w2.transpose(1, 2), offs=offs), f1),
        "dgrad da (N=I, K=D)      dy @ w2": (lambda: gmm(dy, w2, offs=offs), f1),
        "dgrad dx (N=D, K=I)      dh1 @ w1": (lambda: gmm(h, w1, offs=offs), f1),
        "dgrad dx (N=D, K=2I)     dh13 @ w13": (lambda: gmm(h2, w13, offs=offs), 2 * f1),
        "wgrad dw1 [E,I,D]        dh1^T x": (lambda: gmm(h.t(), x, offs=offs), f1),
        "wgrad dw1^T [E,D,I]      x^T dh1": (lambda: gmm(x.t(), h, offs=offs), f1),
        "wgrad dw13 [E,2I,D]      dh13^T x": (lambda: gmm(h2.t(), x, offs=offs), 2 * f1),
        "wgrad dw2 [E,D,I]        dy^T a": (lambda: gmm(dy.t(), h, offs=offs), f1),
        "wgrad dw2^T [E,I,D]      a^T dy": (lambda: gmm(h.t(), dy, offs=offs), f1),
        **tma_wgrad_cases(seg, x, dy, h, h2, f1, tma_tags),
        "add dx += (elementwise)": (lambda: x.add_(dy), 0.0),
        "swiglu fwd ew (3 x PxI)": (lambda: torch.nn.functional.silu(h) * h, 0.0),
    }
    load = "uniform" if zipf is None else f"Zipf {zipf}"
    print(f"\nexpert GEMMs, {load}: P={P} D={D} I={I} E={E}; dense ceiling {ceil.matmul_tflops:.0f} TFLOP/s")
    for name, (fn, fl) in cases.items():
        try:
            ms = time_ms(fn, warmup=2, repeats=10)
            extra = (
                f"{fl / ms / 1e9:6.0f} TFLOP/s {100 * fl / ms / 1e9 / ceil.matmul_tflops:5.1f}%" if fl else ""
            )
            print(f"  {ms:8.3f} ms  {extra}  {name}")
        except Exception as err:
            print(f"  failed {name}: {type(err).__name__}: {str(err)[:160]}")
        torch.cuda.empty_cache()


def ffn_profile(T, args, dev, zipf, backends=("grouped_mm", "grouped_mm_tma")):
    """Kernel breakdown of one expert-FFN fwd+bwd: ours (grouped_swiglu) on each of `backends`, against
    plain torch._grouped_mm."""
    from bench_moe import ffn_grouped_mm, segments
    from r1core.kernels.grouped_swiglu import grouped_swiglu

    E, K, D, I = args.n_routed_experts, args.n_activated_experts, args.dim, args.moe_inter_dim
    P = T * K
    seg = torch.tensor(segments(P, E, zipf), device=dev)
    offs = torch.cumsum(seg, 0, dtype=torch.int32)
    bf = dict(device=dev, dtype=torch.bfloat16)
    w1, w3, w2 = (
        (torch.randn(E, I, D, **bf) * 0.02).requires_grad_(),
        (torch.randn(E, I, D, **bf) * 0.02).requires_grad_(),
        None,
    )
    w2 = (torch.randn(E, D, I, **bf) * 0.02).requires_grad_()
    w13 = torch.stack((w1, w3), dim=1).detach().requires_grad_()  # our layout: gate and up stacked
    x = torch.randn(P, D, **bf).requires_grad_()
    g = torch.randn_like(x)
    ops = [x, w1, w2, w3]
    load = "uniform" if zipf is None else f"Zipf {zipf}"
    for rnd in range(2):  # alternate, so clock drift over the run hits all
        for backend in backends:
            kernel_table(
                lambda b=backend: torch.autograd.grad(
                    grouped_swiglu(x, w13, w2, seg, backend=b), [x, w13, w2], g
                ),
                f"FFN ours ({backend}), {load}, round {rnd}",
                calls=2,
                detail=rnd == 1,
            )
        kernel_table(
            lambda: torch.autograd.grad(ffn_grouped_mm(x, w1, w2, w3, offs), ops, g),
            f"FFN plain, {load}, round {rnd}",
            calls=2,
            detail=rnd == 1,
        )


def layer_profile(T, args, dev):
    """Kernel breakdown of one V3 MoE layer training step, impl=triton against impl=cuda, alternating."""
    from bench_moe import Shape, build_layer, layer_steps

    moe, x = build_layer(Shape("v3", T, args), dev, torch.bfloat16)
    moe.train()
    steps, _ = layer_steps(moe, x, ("triton", "cuda"))
    for rnd in range(2):
        for impl, step in steps.items():
            kernel_table(step, f"MoE layer step impl={impl}, round {rnd}", calls=2, detail=rnd == 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-dispatch", action="store_true")
    ap.add_argument("--skip-gemms", action="store_true")
    ap.add_argument("--skip-profile", action="store_true", help="no per-kernel profile of the FFN")
    ap.add_argument(
        "--tma-variants",
        default=",".join(TMA_TILES),
        help=f"comma-separated TMA weight-gradient variants to time (default all: {list(TMA_TILES)})",
    )
    ap.add_argument(
        "--layer", action="store_true", help="only the V3 MoE layer step, impl=triton vs impl=cuda"
    )
    ap.add_argument(
        "--zipf", type=float, default=None, help="Zipf exponent of the FFN profile's load (default uniform)"
    )
    opts = ap.parse_args()
    tma_tags = [t.strip() for t in opts.tma_variants.split(",") if t.strip()]
    if unknown := [t for t in tma_tags if t not in TMA_TILES]:
        ap.error(f"unknown --tma-variants {unknown}; known: {list(TMA_TILES)}")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    ceil = Ceilings.measure()
    args, T = presets["v3"], 16384
    print(torch.cuda.get_device_name(), torch.__version__, vars(ceil))
    if not opts.skip_dispatch:
        x = torch.randn(T, args.dim, device=dev, dtype=torch.bfloat16)
        dispatch(T, args, x, ceil)
        del x
    if opts.layer:
        layer_profile(T, args, dev)
        return
    if not opts.skip_profile:
        ffn_profile(T, args, dev, opts.zipf)
    if not opts.skip_gemms:
        for zipf in (None, 1.0):
            gemms(T, args, dev, ceil, zipf, tma_tags)


if __name__ == "__main__":
    main()
