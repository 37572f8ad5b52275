"""MoE hot path: routing, permute, unpermute+combine, expert FFN, whole layer; providers side by side.

    python benchmarks/bench_moe.py            # GPU: DeepSeek-V3 layer and small-preset layer
    python benchmarks/bench_moe.py --tiny     # CPU smoke run (Triton interpreter, tiny shapes)

Providers: plain PyTorch (topk routing as DeepSeek-V3's inference Gate, argsort + index_select),
the r1core refs, torch._grouped_mm (torchtitan's GroupedExperts) and a per-expert loop for the FFN,
megatron-core 0.16.1's routing / permute / unpermute functions (no Transformer Engine), ours
(Triton; `grouped_swiglu` picks torch._grouped_mm on Hopper), and the CUDA extension when built.
Routing includes the gate GEMM (`Gate.logits`, bf16 GEMM, fp32 scores). Ceilings (bf16 matmul
TFLOP/s, copy GB/s) are measured in the same run; the FFN row adds a dense SwiGLU MLP of the same
GEMM shapes as the same-run figure for "grouping cost nothing". Providers of a row are timed
round-robin; "ms" is a call inside a stream of calls (the host ahead, as in a model step), "ms
isolated" a single call from an idle GPU. FFN and layer rows time a training step: forward, then
backward into .grad. Writes bench_moe.json and bench_moe.png under
$OUT (or benchmarks/out); the last line printed is the JSON record.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Ceilings, Table, bar_plot, device, finish, out_dir, peak_extra_bytes, time_interleaved  # noqa: E402

from r1core.kernels.grouped_swiglu import grouped_swiglu, grouped_swiglu_backend  # noqa: E402
from r1core.kernels.moe_permute import moe_permute, moe_unpermute  # noqa: E402
from r1core.kernels.moe_route import moe_route  # noqa: E402
from r1core.model import presets  # noqa: E402
from r1core.model.args import ScoreFunc  # noqa: E402
from r1core.model.moe import MoE, permute_ref, route_ref, unpermute_ref  # noqa: E402

ANCHORS = {
    "routing": "anchor: plain PyTorch 0.95 ms (H100)",
    "permute": "anchor: 1.45 ms, HBM bound 0.70 ms (H100)",
}


@dataclass
class Shape:
    name: str
    T: int
    args: object  # ModelArgs of the layer


def shapes(tiny: bool) -> list[Shape]:
    if tiny:
        args = presets["tiny"].replace(
            n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2
        )
        return [Shape("tiny", 64, args)]
    return [Shape("v3", 16384, presets["v3"]), Shape("small", 16384, presets["small"])]


# --------------------------------------------------------------------------------------------- providers
def topk_route(logits_TE, bias_E, spec):
    """Plain PyTorch routing with torch.topk, as DeepSeek-V3's inference Gate (the 0.95 ms anchor)."""
    T, E = logits_TE.shape
    scores = logits_TE.sigmoid() if spec.score_func == ScoreFunc.sigmoid else logits_TE.softmax(dim=-1)
    original = scores
    if bias_E is not None:
        scores = scores + bias_E
    if spec.n_groups > 1:
        scores = scores.view(T, spec.n_groups, -1)
        if spec.score_func == ScoreFunc.sigmoid:
            group = scores.topk(2, dim=-1)[0].sum(dim=-1)
        else:
            group = scores.amax(dim=-1)
        keep = group.topk(spec.topk_groups, dim=-1)[1]
        drop = torch.ones_like(group, dtype=torch.bool).scatter_(1, keep, False)
        scores = scores.masked_fill(drop[..., None], float("-inf")).flatten(1)
    idx = scores.topk(spec.top_k, dim=-1)[1]
    w = original.gather(1, idx)
    if spec.norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return w * spec.route_scale, idx, torch.bincount(idx.flatten(), minlength=E)


def torch_permute(x_TD, idx_TK):
    """Plain PyTorch permute: stable argsort of the flat expert ids, then index_select (the 1.45 ms
    anchor)."""
    order = idx_TK.flatten().argsort(stable=True)
    return x_TD.index_select(0, order // idx_TK.shape[1]), order


def megatron_utils():
    """megatron-core's moe_utils with the TE GEMM hook disabled, or the import error."""
    try:
        import megatron.core.transformer.moe.moe_utils as mu
    except Exception as err:  # report, never fail the benchmark
        return None, f"{type(err).__name__}: {err}"
    mu.te_general_gemm = None  # else the router GEMM raises NameError without Transformer Engine
    return mu, None


def cuda_ext():
    try:
        from r1core.kernels import moe_cuda
    except Exception as err:
        return None, f"{type(err).__name__}: {err}"
    return (moe_cuda, None) if moe_cuda.is_built() else (None, "r1core._C not built")


def ffn_loop(x, w1, w2, w3, seg_list):
    """Per-expert loop with host-known segment sizes (the sync happens once, in setup)."""
    outs, start = [], 0
    for e, n in enumerate(seg_list):
        xs = x[start : start + n]
        outs.append((F.silu(xs @ w1[e].T) * (xs @ w3[e].T)) @ w2[e].T)
        start += n
    return torch.cat(outs + [x.new_zeros(x.shape[0] - start, x.shape[1])])


def ffn_grouped_mm(x, w1, w2, w3, offs):
    """torchtitan's GroupedExperts: three torch._grouped_mm calls, SwiGLU and autograd in PyTorch."""
    h1 = torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs)
    h = F.silu(h1) * torch._grouped_mm(x, w3.transpose(-2, -1), offs=offs)
    return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)


# ------------------------------------------------------------------------------------------------ timing
@dataclass
class Row:
    name: str
    flops: float = 0.0  # per call, for TFLOP/s
    nbytes: float = 0.0  # minimal HBM traffic per call, for GB/s


def measure(
    row: Row, providers: dict[str, Callable], ceil: Ceilings, repeats: int, isolated: bool = True
) -> dict:
    """Providers timed round-robin (common.time_interleaved): "ms" is a call's time in a stream of
    calls, as inside a model step; "ms_isolated" one call from an idle GPU, launch latency included."""
    results = time_interleaved(providers, warmup=1, repeats=repeats, isolated=isolated)
    for name, fn in providers.items():
        if "ms" in results.get(name, {}):
            results[name]["peak_mib"] = peak_extra_bytes(fn) / 2**20
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for r in results.values():
        if "ms" in r:
            if row.flops:
                r["tflops"] = row.flops / r["ms"] / 1e9
                r["pct_peak"] = 100 * r["tflops"] / ceil.matmul_tflops
            if row.nbytes:
                r["gbps"] = row.nbytes / r["ms"] / 1e6
                r["pct_copy"] = 100 * r["gbps"] / ceil.copy_gbps
    return results


def table(title: str, results: dict) -> Table:
    names = list(results)
    t = Table(
        title,
        ["provider", "ms", "ms isolated"]
        + [f"x vs {n}" for n in names]
        + ["TFLOP/s", "% peak", "GB/s", "% copy", "peak MiB"],
    )
    for n, r in results.items():
        if "error" in r:
            t.add(n, "failed: " + r["error"], *[""] * (len(names) + 6))
            continue
        ratios = [results[o]["ms"] / r["ms"] if "ms" in results[o] else "" for o in names]
        t.add(
            n,
            r["ms"],
            r.get("ms_isolated", ""),
            *ratios,
            *(r.get(k, "") for k in ("tflops", "pct_peak", "gbps", "pct_copy")),
            r["peak_mib"],
        )
    return t


# -------------------------------------------------------------------------------------------------- rows
def build_layer(shape: Shape, dev, dtype) -> tuple[MoE, torch.Tensor]:
    """A MoE layer with random weights made directly in `dtype` on `dev` (V3: 22.5 GB of experts)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            moe = MoE(shape.args)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, shape.args.init_std)
        if moe.gate.e_score_correction_bias is not None:
            moe.gate.e_score_correction_bias.normal_(0.0, 1e-3)
    return moe, torch.randn(shape.T, shape.args.dim, device=dev, dtype=dtype)


def routing_row(moe, x, mu, cuda, ceil, repeats):
    gate, spec, bias = moe.gate, moe.gate.spec, moe.gate.e_score_correction_bias
    groups = dict(num_groups=spec.n_groups, group_topk=spec.topk_groups) if spec.n_groups > 1 else {}
    providers = {
        "torch topk": lambda: topk_route(gate.logits(x), bias, spec),
        "ref (stable sort)": lambda: route_ref(gate.logits(x), bias, spec),
        "megatron": lambda: mu.topk_routing_with_score_function(
            gate.logits(x),
            spec.top_k,
            scaling_factor=spec.route_scale,
            score_function=spec.score_func.value,
            expert_bias=bias,
            **groups,
        ),
        "triton": lambda: moe_route(gate.logits(x), bias, spec),
        "cuda": lambda: cuda.moe_route_cuda(gate.logits(x), bias, spec),
        "gate GEMM alone": lambda: gate.logits(x),
    }
    row = Row("routing incl. gate GEMM", flops=2.0 * x.shape[0] * x.shape[1] * spec.n_experts)
    with torch.no_grad():
        return row, measure(row, _available(providers, mu, cuda), ceil, repeats)


def dispatch_rows(moe, x, mu, cuda, ceil, repeats):
    """Permute, then unpermute + weighted combine, on one routing of x."""
    spec, T, D = moe.gate.spec, x.shape[0], x.shape[1]
    with torch.no_grad():
        w, idx, counts = route_ref(moe.gate.logits(x), moe.gate.e_score_correction_bias, spec)
        rmap = torch.zeros(T, spec.n_experts, device=x.device, dtype=torch.bool).scatter_(1, idx, True)
        probs = torch.zeros(T, spec.n_experts, device=x.device).scatter_(1, idx, w)
        _, pos = permute_ref(x[:, :1], idx, counts)
        sorted_idx = torch_permute(x[:, :1], idx)[1] // spec.top_k
        y = torch.randn(T * spec.top_k, D, device=x.device, dtype=x.dtype)
        es = x.element_size()
        nbytes = (T + T * spec.top_k) * D * es
        permute = {
            "torch argsort+index_select": lambda: torch_permute(x, idx),
            "ref": lambda: permute_ref(x, idx, counts),
            "megatron": lambda: mu.permute(x, rmap, num_out_tokens=T * spec.top_k),
            "triton": lambda: moe_permute(x, idx, counts),
            "cuda": lambda: cuda.moe_permute_cuda(x, idx, counts),
        }
        unpermute = {
            "ref": lambda: unpermute_ref(y, pos, w),
            "megatron": lambda: mu.unpermute(y, sorted_idx, x.shape, probs=probs, routing_map=rmap),
            "triton": lambda: moe_unpermute(y, pos, w),
            "cuda": lambda: cuda.moe_unpermute_cuda(y, pos, w),
        }
        r1, r2 = Row("permute", nbytes=nbytes), Row("unpermute+combine", nbytes=nbytes)
        return [
            (r1, measure(r1, _available(permute, mu, cuda), ceil, repeats)),
            (r2, measure(r2, _available(unpermute, mu, cuda), ceil, repeats)),
        ]


def segments(P: int, E: int, zipf: float | None) -> list[int]:
    """Rows per expert summing to P: equal, or Zipf(zipf) over the experts (expert 0 the hottest)."""
    if zipf is None:
        return [P // E + (e < P % E) for e in range(E)]
    weights = [1.0 / (e + 1) ** zipf for e in range(E)]
    seg = [math.floor(P * w / sum(weights)) for w in weights]
    seg[0] += P - sum(seg)
    return seg


def training_step(fn: Callable[[], object], params: list[torch.Tensor], grads):
    """One forward + backward into .grad, as a training step runs it (grads reset to None first, as
    zero_grad does): a provider whose weight gradients come back in another memory layout than the
    weights (torch._grouped_mm of a transposed view) pays the copy AccumulateGrad makes, as it would
    in training; torch.autograd.grad would hide it."""

    def run():
        for p in params:
            p.grad = None
        outs = fn()
        outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
        keep = [(o, g) for o, g in zip(outs, grads) if o is not None]
        torch.autograd.backward([o for o, _ in keep], [g for _, g in keep])

    return run


def dense_swiglu(x, w1, w2, w3):
    """One dense SwiGLU MLP with the grouped FFN's GEMM shapes and FLOPs (E=1): what the grouped
    kernels would reach if grouping cost nothing, measured in the same run."""
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def ffn_row(moe, T, zipf, ceil, repeats, skip_loop=False):
    w13, w2 = moe.experts.w13, moe.experts.w2
    E, _, I, D = w13.shape
    # the peers keep gate and up as separate weights (torchtitan's layout); ours are stacked in w13
    w1, w3 = (w13[:, i].detach().clone().requires_grad_() for i in (0, 1))
    P = T * moe.gate.spec.top_k
    seg_list = segments(P, E, zipf)
    seg = torch.tensor(seg_list, device=w13.device)
    offs = torch.cumsum(seg, 0, dtype=torch.int32)
    x = torch.randn(P, D, device=w13.device, dtype=w13.dtype, requires_grad=True)
    g = torch.randn_like(x)
    ops = [x, w1, w2, w3, w13]

    def step(fn):
        return training_step(fn, ops, [g])

    auto = grouped_swiglu_backend(x, w13, w2)
    providers = {} if skip_loop else {"per-expert loop": step(lambda: ffn_loop(x, w1, w2, w3, seg_list))}
    providers["torch._grouped_mm"] = step(lambda: ffn_grouped_mm(x, w1, w2, w3, offs))
    providers[f"ours ({auto})"] = step(lambda: grouped_swiglu(x, w13, w2, seg))
    if auto != "triton":
        other = "grouped_mm_tma" if auto == "grouped_mm" else "grouped_mm"
        providers[f"ours ({other})"] = step(lambda: grouped_swiglu(x, w13, w2, seg, backend=other))
        providers["ours (triton)"] = step(lambda: grouped_swiglu(x, w13, w2, seg, backend="triton"))
    if zipf is None and x.is_cuda:
        d1, d3, d2 = (w[0].detach().clone().requires_grad_() for w in (w1, w3, w2))
        providers["dense SwiGLU MLP, same FLOPs"] = training_step(
            lambda: dense_swiglu(x, d1, d2, d3), [x, d1, d2, d3], [g]
        )
    load = "uniform" if zipf is None else f"Zipf s={zipf}, hottest expert {max(seg_list)} rows"
    row = Row(f"expert FFN fwd+bwd, {load}", flops=18.0 * P * D * I)
    try:
        return row, measure(row, providers, ceil, repeats, isolated=False)
    finally:
        for p in ops:
            p.grad = None


def plain_layer(moe, x_BTD):
    """Plain PyTorch MoE layer: topk routing, argsort permute, torch._grouped_mm experts, index_add
    combine."""
    x_TD = x_BTD.flatten(0, 1)
    spec = moe.gate.spec
    w, idx, counts = topk_route(moe.gate.logits(x_TD), moe.gate.e_score_correction_bias, spec)
    x_PD, order = torch_permute(x_TD, idx)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    y_PD = ffn_grouped_mm(x_PD, moe.experts.w1, moe.experts.w2, moe.experts.w3, offs)  # w1, w3: views of w13
    y = (
        torch.zeros(x_TD.shape, device=x_TD.device)
        .index_add_(0, order // spec.top_k, y_PD.float() * w.flatten()[order, None])
        .to(x_TD.dtype)
    )
    if moe.shared_experts is not None:
        y = y + moe.shared_experts(x_TD)
    return y.view_as(x_BTD), None


def layer_steps(moe, x, impls):
    """{impl: one MoE layer training step} on x_TD viewed as sequences of 2048, and the tensors whose .grad
    the steps set; impl "plain" is `plain_layer`, the others `moe` with that MoE implementation."""
    T, D = x.shape
    seq = 2048 if T % 2048 == 0 else T
    x_BTD = x.view(T // seq, seq, D).detach().requires_grad_()
    ops = [x_BTD] + [p for p in moe.parameters() if p.requires_grad]
    grads = [torch.randn_like(x_BTD), torch.ones((), device=x.device)]

    def step(impl):
        def fwd():
            if impl == "plain":
                return plain_layer(moe, x_BTD)
            moe.set_impl(impl)
            return moe(x_BTD)

        return training_step(fwd, ops, grads)

    return {impl: step(impl) for impl in impls}, ops


def layer_row(moe, x, cuda, ceil, repeats):
    T, D = x.shape
    steps, ops = layer_steps(moe, x, ("ref", "plain", "triton", "cuda"))
    providers = {
        "ref (impl=ref)": steps["ref"],
        "plain torch + _grouped_mm": steps["plain"],
        "triton (impl=triton)": steps["triton"],
        "cuda (impl=cuda)": steps["cuda"],
    }
    spec = moe.gate.spec
    row = Row("MoE layer fwd+bwd", flops=18.0 * T * spec.top_k * D * moe.args.moe_inter_dim)
    try:
        return row, measure(row, _available(providers, True, cuda), ceil, repeats, isolated=False)
    finally:
        for p in ops:
            p.grad = None


def _available(providers: dict, mu, cuda) -> dict:
    return {n: f for n, f in providers.items() if (mu or "megatron" not in n) and (cuda or "cuda" not in n)}


# -------------------------------------------------------------------------------------------------- main
ROW_KINDS = ("route", "dispatch", "ffn", "layer")


def run_shape(shape: Shape, dev, dtype, ceil, mu, cuda, repeats, kinds=ROW_KINDS, skip_loop=False):
    moe, x = build_layer(shape, dev, dtype)
    moe.train()
    if "route" in kinds:
        yield routing_row(moe, x, mu, cuda, ceil, repeats)
    if "dispatch" in kinds:
        yield from dispatch_rows(moe, x, mu, cuda, ceil, repeats)
    # FFN and layer steps take 50 ms to 1 s at V3 shapes: fewer repeats keep the run inside minutes.
    if "ffn" in kinds:
        for zipf in (None, 1.0):
            yield ffn_row(moe, shape.T, zipf, ceil, max(2, repeats // 2), skip_loop)
    if "layer" in kinds:
        yield layer_row(moe, x, cuda, ceil, max(2, repeats // 3))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run at tiny shapes")
    ap.add_argument("--shapes", default=None, help="comma-separated subset of: v3,small (GPU)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--rows", default=",".join(ROW_KINDS), help=f"comma-separated subset of: {ROW_KINDS}")
    ap.add_argument(
        "--skip-loop", action="store_true", help="no per-expert loop in the FFN rows (8 s a call at V3)"
    )
    opts = ap.parse_args(argv)
    kinds = opts.rows.split(",")
    unknown = sorted(set(kinds) - set(ROW_KINDS))
    if unknown:
        ap.error(f"--rows: unknown {unknown}; choose from {list(ROW_KINDS)}")
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    repeats = opts.repeats or (2 if opts.tiny or dev.type == "cpu" else 10)
    torch.manual_seed(0)
    ceil = Ceilings.measure()
    mu, mu_err = megatron_utils()
    cuda, cuda_err = cuda_ext()
    record = {
        "ceilings": vars(ceil),
        "dtype": str(dtype),
        "megatron": mu_err or "ok",
        "cuda_ext": cuda_err or "ok",
        "anchors": ANCHORS,
        "rows": {},
    }
    tables, labels, speedups = [], [], []
    wanted = set(opts.shapes.split(",")) if opts.shapes else None
    for shape in shapes(opts.tiny or dev.type == "cpu"):
        if wanted and shape.name not in wanted:
            continue
        for row, res in run_shape(shape, dev, dtype, ceil, mu, cuda, repeats, kinds, opts.skip_loop):
            key = f"{shape.name}: {row.name}"
            note = next((a for k, a in ANCHORS.items() if row.name.startswith(k)), "")
            tables.append(table(key + (f" ({note})" if note else ""), res))
            record["rows"][key] = res
            base = next(iter(res.values())).get("ms")
            for n, r in res.items():
                if "ms" in r and base:
                    labels.append(f"{shape.name} {row.name[:18]} / {n}")
                    speedups.append(base / r["ms"])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    bar_plot(
        os.path.join(out_dir(), "bench_moe.png"),
        "MoE: speedup vs each row's first provider",
        labels,
        speedups,
        "x vs first provider",
    )
    finish("bench_moe", tables, record)


if __name__ == "__main__":
    main()
