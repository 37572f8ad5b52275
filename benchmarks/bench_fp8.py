"""FP8 blockwise GEMMs (DeepSeek-V3 recipe, r1core.kernels.fp8) beside bf16 at V3 and small-preset shapes.

    python benchmarks/bench_fp8.py            # GPU
    python benchmarks/bench_fp8.py --tiny     # CPU smoke run (reference path, tiny shapes)

Rows per linear shape (M tokens = B4 x T2048, K in, N out), providers timed round-robin in one run:
  gemm      the forward GEMM alone on pre-quantized operands: bf16 torch.mm; fp8 torch.nn.functional.scaled_mm
            (1x128 x 128x128, cuBLASLt); fp8 Triton (`_fp8_gemm_kernel`)
  linear    forward + backward into .grad of F.linear (bf16) vs fp8_linear (quantization included: what a
            training step pays), eager and torch.compile'd
and grouped-experts rows (SwiGLU over 128-padded segments, fwd + bwd): bf16 torch._grouped_mm vs fp8 Triton.
TFLOP/s counts the bf16-equivalent FLOPs; the ratio column is bf16 time / provider time (> 1: faster).
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
    "v3 wq_a 7168->1536": (8192, 7168, 1536), "v3 dense w1 7168->18432": (8192, 7168, 18432),
    "v3 dense w2 18432->7168": (8192, 18432, 7168), "v3 wo 16384->7168": (8192, 16384, 7168),
    "small w1 2048->5632": (8192, 2048, 5632), "small w2 5632->2048": (8192, 5632, 2048),
    "small wq_b 768->3072": (8192, 768, 3072),
}
COMPILED = ("v3 dense w1 7168->18432", "small w1 2048->5632")  # compiled rows: the compile time adds up
TINY_SHAPES = {"tiny 256->384": (200, 256, 384)}


def gemm_row(M, K, N, dev, dtype):
    a, w = torch.randn(M, K, device=dev, dtype=dtype), torch.randn(N, K, device=dev, dtype=dtype) * 0.02
    a_q, a_s = fp8.quantize_rows(a)
    w_q, w_s = fp8.quantize_blocks(w)
    fns = {"bf16 mm": lambda: a @ w.T}
    for impl in ("torch", "triton") if dev.type == "cuda" else ("ref",):
        fns[f"fp8 {impl}"] = lambda impl=impl: fp8.blockwise_gemm(a_q, a_s, w_q, w_s, dtype, impl)
    return fns, 2 * M * K * N


def linear_row(M, K, N, dev, dtype, compile_: bool):
    x = torch.randn(M, K, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(N, K, device=dev, dtype=dtype) * 0.02).requires_grad_()
    dy = torch.randn(M, N, device=dev, dtype=dtype)
    impl = None if dev.type == "cuda" else "ref"

    def step(fn):
        def run():
            x.grad = w.grad = None
            fn(x, w).backward(dy)
        return run
    bf16, f8 = F.linear, lambda x_, w_: fp8.fp8_linear(x_, w_, impl)
    if compile_:
        bf16, f8 = torch.compile(bf16), torch.compile(f8)
    return {"bf16 linear": step(bf16), "fp8 linear": step(f8)}, 6 * M * K * N


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
    fns = {"fp8 grouped": step(lambda: fp8.grouped_swiglu_fp8(x, w1, w2, w3, seg))}
    if dev.type == "cuda":
        fns = {"bf16 grouped_mm": step(bf16), **fns}
    return fns, 6 * 3 * P * D * I


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args(argv)
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ceil = Ceilings.measure()
    shapes = TINY_SHAPES if a.tiny or dev.type != "cuda" else LINEAR_SHAPES
    title = f"FP8 blockwise vs bf16 (matmul peak {ceil.matmul_tflops:.0f} TFLOP/s, bf16-equivalent FLOPs)"
    table = Table(title,
                  ["row", "provider", "ms", "TFLOP/s", "% of bf16 peak", "× bf16 speed"])
    rows = []
    cases = []
    for name, (M, K, N) in shapes.items():
        cases.append((f"gemm {name}", lambda M=M, K=K, N=N: gemm_row(M, K, N, dev, dtype)))
        cases.append((f"linear fwd+bwd {name}", lambda M=M, K=K, N=N: linear_row(M, K, N, dev, dtype, False)))
        if dev.type == "cuda" and name in COMPILED:
            cases.append((f"linear compiled {name}",
                          lambda M=M, K=K, N=N: linear_row(M, K, N, dev, dtype, True)))
    if dev.type == "cuda":
        cases.append(("experts small (32 x 2048->768, top-4)",
                      lambda: experts_row(8192, 32, 4, 2048, 768, dev, dtype)))
        cases.append(("experts v3, 32 of 256 (7168->2048, 1024 rows each)",
                      lambda: experts_row(4096, 32, 8, 7168, 2048, dev, dtype)))
    for row_name, build in cases:
        try:
            fns, flops = build()
            res = time_interleaved(fns, warmup=2, repeats=a.repeats, isolated=False)
        except Exception as e:  # one failing row must not hide the others
            rows.append({"row": row_name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            table.add(row_name, "failed", rows[-1]["error"][:100], "", "", "")
            continue
        base = next((r["ms"] for n, r in res.items() if n.startswith("bf16") and "ms" in r), None)
        for prov, r in res.items():
            if "error" in r:
                table.add(row_name, prov, "failed: " + r["error"][:80], "", "", "")
                rows.append({"row": row_name, "provider": prov, **r})
                continue
            tf = flops / r["ms"] / 1e9
            ratio = base / r["ms"] if base else float("nan")
            table.add(row_name, prov, r["ms"], tf, 100 * tf / ceil.matmul_tflops, ratio)
            rows.append({"row": row_name, "provider": prov, "ms": r["ms"], "tflops": tf, "x_bf16": ratio})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    record = {"matmul_peak_tflops": ceil.matmul_tflops, "rows": rows,
              "torch_blockwise": dev.type == "cuda" and fp8.torch_blockwise_supported(0, False)}
    finish("bench_fp8", [table], record)
    return record


if __name__ == "__main__":
    main()
