"""FP8 blockwise GEMMs (DeepSeek-V3 recipe, r1core.kernels.fp8) beside bf16 at V3 and small-preset shapes.

    python benchmarks/bench_fp8.py            # GPU
    python benchmarks/bench_fp8.py --tiny     # CPU smoke run (reference path, tiny shapes)

Rows per linear shape (M tokens = B4 x T2048, K in, N out), providers timed round-robin in one run:
  gemm      the forward GEMM alone on pre-quantized operands: bf16 torch.mm; fp8 torch.nn.functional.scaled_mm
            (1x128 x 128x128, cuBLASLt); fp8 Triton (`_fp8_gemm_kernel`)
  linear    forward + backward into .grad of F.linear (bf16) vs fp8_linear (quantization included: what a
            training step pays), eager and torch.compile'd
  quantize  x [M, K] into both tilings an fp8 linear reads (1x128 along K, 128-token tiles transposed):
            the PyTorch reference eager and torch.compile'd (inductor fuses it) vs our one-pass Triton kernel;
            GB/s counts reading x once and writing both fp8 copies
and grouped-experts rows (SwiGLU over 128-padded segments, fwd + bwd): bf16 torch._grouped_mm vs our fp8
Triton grouped kernels vs one fp8 linear per expert (torch scaled_mm; a host sync for the segment bounds)
(the grouped rows are why model.precision=fp8_dense keeps the routed experts in bf16).
TFLOP/s counts the bf16-equivalent FLOPs; the ratio column is the row's first provider's time / this
provider's time (> 1: faster; the first provider is bf16, or the reference quantizer).
--quick keeps the rows the issue-19 GPU session needs (small-preset shapes, one V3 shape, small experts).
The last line printed is the JSON record (bench_fp8.json under $OUT).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Ceilings, Table, device, finish, time_interleaved  # noqa: E402

from r1core.kernels import fp8  # noqa: E402

LINEAR_SHAPES = {  # name: (M, K, N)
    "v3 wq_a 7168->1536": (8192, 7168, 1536),
    "v3 dense w1 7168->18432": (8192, 7168, 18432),
    "v3 dense w2 18432->7168": (8192, 18432, 7168),
    "v3 wo 16384->7168": (8192, 16384, 7168),
    "small w1 2048->5632": (8192, 2048, 5632),
    "small w2 5632->2048": (8192, 5632, 2048),
    "small wq_b 768->3072": (8192, 768, 3072),
}
COMPILED = ("v3 dense w1 7168->18432", "small w1 2048->5632")  # compiled rows: the compile time adds up
QUICK = ("v3 dense w1 7168->18432", "small w1 2048->5632", "small wq_b 768->3072")
TINY_SHAPES = {"tiny 256->384": (200, 256, 384)}


def gemm_row(M, K, N, dev, dtype):
    a, w = torch.randn(M, K, device=dev, dtype=dtype), torch.randn(N, K, device=dev, dtype=dtype) * 0.02
    a_q, a_s = fp8.quantize_rows(a)
    w_q, w_s = fp8.quantize_blocks(w)
    w_rq, w_rs = fp8.quantize_rows(w)  # 1x128 scales on both operands: wgrad's kind
    fns = {"bf16 mm": lambda: a @ w.T}
    for impl in ("torch", "triton") if dev.type == "cuda" else ("ref",):
        fns[f"fp8 {impl}"] = lambda impl=impl: fp8.blockwise_gemm(a_q, a_s, w_q, w_s, dtype, impl)
    if dev.type == "cuda":
        # torch's own call (blockwise_gemm would fall back to Triton where torch lacks this scaling)
        fns["fp8 torch, both 1x128 (wgrad's)"] = lambda: fp8._torch_gemm(a_q, a_s, w_rq, w_rs, dtype)
    return fns, 2 * M * K * N


def linear_row(M, K, N, dev, dtype, compile_: bool):
    x = torch.randn(M, K, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(N, K, device=dev, dtype=dtype) * 0.02).requires_grad_()
    dy = torch.randn(M, N, device=dev, dtype=dtype)
    impl = fp8.backend(dev, False)  # resolved here: torch.compile should not trace the backend probe

    def step(fn):
        def run():
            x.grad = w.grad = None
            fn(x, w).backward(dy)

        return run

    bf16, f8 = F.linear, lambda x_, w_: fp8.fp8_linear(x_, w_, impl)
    if compile_:
        bf16, f8 = torch.compile(bf16), torch.compile(f8)
    return {"bf16 linear": step(bf16), "fp8 linear": step(f8)}, 6 * M * K * N


def quantize_row(M, K, dev, dtype):
    """Both tilings of x: the reference (eager / compiled) against the fused Triton pass; (fns, bytes)."""
    x = torch.randn(M, K, device=dev, dtype=dtype)
    fns = {"torch ref": lambda: fp8.quantize_dual(x, "ref")}
    if dev.type == "cuda":
        ref_c = torch.compile(lambda t: fp8.quantize_dual(t, "ref"))
        fns["torch ref compiled"] = lambda: ref_c(x)
        fns["fp8 triton fused"] = lambda: fp8.quantize_dual(x, "triton")
    return fns, M * K * (x.element_size() + 2) + 2 * 4 * M * K // 128  # read x; write q, qt and their scales


def experts_row(T, E, K, D, I, dev, dtype):  # noqa: E741 (the paper's I)
    """SwiGLU experts, fwd + bwd: bf16 torch._grouped_mm vs fp8 grouped (128-padded segments, uniform)."""
    counts = torch.full((E,), T * K // E, device=dev)
    seg = (counts + 127) // 128 * 128
    P = int(seg.sum())
    x = torch.randn(P, D, device=dev, dtype=dtype, requires_grad=True)
    w1, w3 = [(torch.randn(E, I, D, device=dev, dtype=dtype) * 0.02).requires_grad_() for _ in range(2)]
    w2 = (torch.randn(E, D, I, device=dev, dtype=dtype) * 0.02).requires_grad_()
    offs = torch.cumsum(seg, 0).to(torch.int32)
    dy = torch.randn(P, D, device=dev, dtype=dtype)

    def bf16():
        h1 = torch._grouped_mm(x, w1.transpose(1, 2), offs=offs)
        h3 = torch._grouped_mm(x, w3.transpose(1, 2), offs=offs)
        return torch._grouped_mm(F.silu(h1) * h3, w2.transpose(1, 2), offs=offs)

    def step(fn):
        def run():
            x.grad = w1.grad = w2.grad = w3.grad = None
            fn().backward(dy)

        return run

    bounds = [0, *torch.cumsum(seg, 0).tolist()]

    def per_expert():  # the alternative to a grouped kernel: one fp8 linear (torch scaled_mm) per expert
        outs = []
        for e in range(E):
            rows = x[bounds[e] : bounds[e + 1]]
            h13 = fp8.fp8_linear(rows, torch.cat([w1[e], w3[e]]), impl)
            h1, h3 = h13.chunk(2, dim=-1)
            outs.append(fp8.fp8_linear(F.silu(h1) * h3, w2[e], impl))
        return torch.cat(outs)

    impl = fp8.backend(dev, False)
    fns = {
        "fp8 grouped": step(lambda: fp8.grouped_swiglu_fp8(x, torch.stack((w1, w3), dim=1), w2, seg)),
        "fp8 per-expert linear loop": step(per_expert),
    }
    if dev.type == "cuda":
        fns = {"bf16 grouped_mm": step(bf16), **fns}
    return fns, 6 * 3 * P * D * I


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="only the rows the issue-19 GPU session runs")
    a = p.parse_args(argv)
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ceil = Ceilings.measure()
    shapes = TINY_SHAPES if a.tiny or dev.type != "cuda" else LINEAR_SHAPES
    if a.quick and shapes is LINEAR_SHAPES:
        shapes = {k: v for k, v in shapes.items() if k in QUICK}
    title = f"FP8 blockwise vs bf16 (matmul peak {ceil.matmul_tflops:.0f} TFLOP/s, bf16-equivalent FLOPs)"
    table = Table(title, ["row", "provider", "ms", "TFLOP/s or GB/s", "% of bf16 peak", "× first provider"])
    rows = []
    cases = []
    quantized = set()
    for name, (M, K, N) in shapes.items():
        if (M, K) not in quantized:
            quantized.add((M, K))
            cases.append((f"quantize x {M}x{K}", lambda M=M, K=K: quantize_row(M, K, dev, dtype)))
        cases.append((f"gemm {name}", lambda M=M, K=K, N=N: gemm_row(M, K, N, dev, dtype)))
        cases.append((f"linear fwd+bwd {name}", lambda M=M, K=K, N=N: linear_row(M, K, N, dev, dtype, False)))
        if dev.type == "cuda" and name in COMPILED and not (a.quick and name.startswith("v3")):
            cases.append(
                (f"linear compiled {name}", lambda M=M, K=K, N=N: linear_row(M, K, N, dev, dtype, True))
            )
    if dev.type == "cuda":
        cases.append(
            ("experts small (32 x 2048->768, top-4)", lambda: experts_row(8192, 32, 4, 2048, 768, dev, dtype))
        )
        if not a.quick:
            cases.append(
                (
                    "experts v3, 32 of 256 (7168->2048, 1024 rows each)",
                    lambda: experts_row(4096, 32, 8, 7168, 2048, dev, dtype),
                )
            )
    for row_name, build in cases:
        try:
            fns, flops = build()
            res = time_interleaved(fns, warmup=2, repeats=a.repeats, isolated=False)
        except Exception as e:  # one failing row must not hide the others
            rows.append({"row": row_name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            table.add(row_name, "failed", rows[-1]["error"][:100], "", "", "")
            continue
        first = next(iter(fns))
        base = res[first].get("ms")
        for prov, r in res.items():
            if "error" in r:
                table.add(row_name, prov, "failed: " + r["error"][:80], "", "", "")
                rows.append({"row": row_name, "provider": prov, **r})
                continue
            rate = flops / r["ms"] / 1e9  # TFLOP/s, or GB/s for the quantize rows (flops holds bytes)
            ratio = base / r["ms"] if base else float("nan")
            if row_name.startswith("quantize"):
                table.add(row_name, prov, r["ms"], rate * 1e3, "", ratio)
                rows.append(
                    {"row": row_name, "provider": prov, "ms": r["ms"], "gb_s": rate * 1e3, "x_first": ratio}
                )
                continue
            table.add(row_name, prov, r["ms"], rate, 100 * rate / ceil.matmul_tflops, ratio)
            rows.append({"row": row_name, "provider": prov, "ms": r["ms"], "tflops": rate, "x_bf16": ratio})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    record = {
        "matmul_peak_tflops": ceil.matmul_tflops,
        "rows": rows,
        "torch_blockwise": dev.type == "cuda" and fp8.torch_blockwise_supported(0, False),
        "torch_blockwise_1x128_both": dev.type == "cuda" and fp8.torch_blockwise_supported(0, True),
    }
    finish("bench_fp8", [table], record)
    return record


if __name__ == "__main__":
    main()
