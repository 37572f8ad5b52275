"""GRPO loss from hidden states, fwd+bwd and forward-only log-probs: naive PyTorch, Liger, ours.

    python benchmarks/bench_grpo_loss.py         # GPU: B8xT1024 H4096 V151936 and B4xT1024 H7168 V129280,
                                                 # bf16
    python benchmarks/bench_grpo_loss.py --tiny  # CPU check at a tiny shape (Triton interpreter)

Per provider: median ms, x the roofline (6*N*H*V FLOPs at the matmul peak measured in this run; 2NHV for
forward-only), x naive, x Liger (best Liger variant that ran), TFLOP/s and % of peak, peak memory beyond
what was allocated before the call, with and without the gradient buffers themselves (grad_W [V, H] alone
is 1.16 GiB at H4096 V151936 bf16). Every provider's loss is checked against the naive one. GB/s is not
reported: each provider is matmul-bound, and its bytes depend on its chunking rather than on the op.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported

from common import Ceilings, Table, bar_plot, device, finish, out_dir, peak_extra_bytes, time_ms  # noqa: E402

from r1core.kernels.grpo_loss import grpo_loss, grpo_loss_ref, token_logprobs  # noqa: E402

G = sys.modules["r1core.kernels.grpo_loss"]

SHAPES = {
    "B8xT1024_H4096_V151936": (8, 1024, 4096, 151936),
    "B4xT1024_H7168_V129280": (4, 1024, 7168, 129280),
}
TINY = {"tiny_B2xT16_H64_V250": (2, 16, 64, 250)}
OURS = ("chunked", "chunked_fp32", "triton")
LOSS_KW = dict(beta=0.04, eps_low=0.2, eps_high=0.2, agg="seq_mean_token_mean")
GiB = float(1 << 30)


def make_inputs(b, t, h, v, dtype):
    dev = device()
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(b, t, h, device=dev, generator=g).to(dtype)
    weight = (torch.randn(v, h, device=dev, generator=g) / h**0.5).to(dtype)  # logits ~ N(0, 1)
    targets = torch.randint(0, v, (b, t), device=dev, generator=g)
    mask = torch.ones(b, t, device=dev, dtype=torch.bool)
    logp, _ = token_logprobs(hidden, weight, targets, impl="ref")  # the naive path: must not hinge on ours
    noise = lambda: 0.1 * torch.randn(b, t, device=dev, generator=g)  # noqa: E731
    return dict(
        hidden=hidden.requires_grad_(),
        weight=weight.requires_grad_(),
        targets=targets,
        mask=mask,
        advantages=torch.randn(b, device=dev, generator=g),
        old=logp + noise(),
        ref=logp + noise(),
        logp=logp,
    )


def ours(impl, chunk_bytes=None):
    def loss(x):
        saved = G.CHUNK_BYTES
        G.CHUNK_BYTES = chunk_bytes or saved
        try:
            return grpo_loss(
                x["hidden"],
                x["weight"],
                x["targets"],
                x["mask"],
                x["advantages"],
                x["old"],
                x["ref"],
                impl=impl,
                **LOSS_KW,
            )[0]
        finally:
            G.CHUNK_BYTES = saved

    return loss


def naive(x):
    return grpo_loss_ref(
        x["hidden"], x["weight"], x["targets"], x["mask"], x["advantages"], x["old"], x["ref"], **LOSS_KW
    )[0]


def liger(compiled: bool, chunk_size: int):
    """LigerFusedLinearGRPOLoss (liger-kernel 0.8.5): loss_type "grpo" = seq_mean_token_mean on full masks."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    mod = LigerFusedLinearGRPOLoss(
        beta=LOSS_KW["beta"],
        compiled=compiled,
        use_ref_model=True,
        chunk_size=chunk_size,
        epsilon_low=0.2,
        epsilon_high=0.2,
        loss_type="grpo",
        temperature=1.0,
    )

    def loss(x):
        return mod(
            x["hidden"],
            x["weight"],
            x["targets"],
            x["mask"],
            x["advantages"],
            ref_per_token_logps=x["ref"],
            old_per_token_logps=x["old"],
        )[0]

    return loss


def providers() -> dict:
    out = {"naive": naive}
    try:
        import liger_kernel  # noqa: F401

        out.update({"liger_compiled_c4": liger(True, 4), "liger_eager_c4": liger(False, 4)})
    except Exception as e:  # absent, or broken against this torch / triton: reported, not fatal
        out["liger"] = f"unavailable ({type(e).__name__}: {e})"
    out.update({f"ours_{impl}": ours(impl) for impl in OURS})
    # larger chunks re-read grad_W fewer times: the speed the 1 GiB memory goal costs
    out["ours_chunked_2GiB"] = ours("chunked", 2 << 30)
    return out


def measure(step, reset, tiny: bool) -> tuple[float, int]:
    """(median ms, peak extra bytes); slow providers get fewer repeats. reset() frees the last call's
    gradients so that the peak counts the ones this call allocates."""
    probe = time_ms(step, warmup=1, repeats=1)
    reps = (1, 2) if tiny else ((1, 3) if probe > 200 else (3, 10))
    ms = time_ms(step, warmup=reps[0], repeats=reps[1])
    reset()
    return ms, peak_extra_bytes(step)


def bench_fwd_bwd(x, fn, tiny: bool) -> dict:
    def reset():
        x["hidden"].grad = x["weight"].grad = None

    def step():
        reset()
        fn(x).backward()

    ms, peak = measure(step, reset, tiny)
    reset()
    loss = fn(x).detach().float().item()
    grads = sum(t.numel() * t.element_size() for t in (x["hidden"], x["weight"]))
    return dict(
        ms=ms, peak_gib=peak / GiB, extra_excl_grads_gib=(peak - grads) / GiB if peak else 0.0, loss=loss
    )


def bench_forward(x, impl, tiny: bool) -> dict:
    step = lambda: token_logprobs(x["hidden"], x["weight"], x["targets"], impl=impl)  # noqa: E731
    ms, peak = measure(step, lambda: None, tiny)
    logp_diff = (step()[0] - x["logp"]).abs().max().item()
    return dict(ms=ms, peak_gib=peak / GiB, extra_excl_grads_gib=peak / GiB, logp_max_diff_vs_naive=logp_diff)


def run_shape(name, shape, dtype, peak_tflops, tiny) -> list[dict]:
    b, t, h, v = shape
    x = make_inputs(b, t, h, v, dtype)
    n = b * t
    rows = []
    for prov, fn in providers().items():
        run = (lambda fn=fn: bench_fwd_bwd(x, fn, tiny)) if callable(fn) else (lambda fn=fn: fn)
        rows.append(_guarded(name, "fwd+bwd", prov, 6 * n * h * v, run))
    for impl in ("ref",) + OURS:
        prov = "naive" if impl == "ref" else f"ours_{impl}"
        rows.append(
            _guarded(
                name, "fwd logprobs", prov, 2 * n * h * v, lambda impl=impl: bench_forward(x, impl, tiny)
            )
        )
    _ratios(rows, peak_tflops)
    x.clear()  # free this shape's inputs before the next one
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def _guarded(shape, mode, prov, flops, fn) -> dict:
    row = dict(shape=shape, mode=mode, provider=prov, flops=flops)
    try:
        res = fn()
        if isinstance(res, str):
            row["status"] = res
        else:
            row.update(res, status="ok")
    except Exception as e:  # a provider failing (OOM, dynamo) is a result to report, not a crash
        row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"  {shape} {mode} {prov}: {row.get('ms', float('nan')):.2f} ms {row['status']}", flush=True)
    return row


def _ratios(rows, peak_tflops) -> None:
    for mode in {r["mode"] for r in rows}:
        ok = [r for r in rows if r["mode"] == mode and r["status"] == "ok"]
        base = {r["provider"]: r["ms"] for r in ok}
        lig = min((r["ms"] for r in ok if r["provider"].startswith("liger")), default=None)
        ref_loss = next((r.get("loss") for r in ok if r["provider"] == "naive"), None)
        for r in ok:
            roof_ms = r["flops"] / (peak_tflops * 1e9)
            r.update(
                x_roofline=r["ms"] / roof_ms,
                tflops=r["flops"] / r["ms"] / 1e9,
                pct_peak=100 * r["flops"] / r["ms"] / 1e9 / peak_tflops,
                x_naive=r["ms"] / base["naive"] if "naive" in base else None,
                x_liger=r["ms"] / lig if lig else None,
                loss_diff_vs_naive=abs(r["loss"] - ref_loss)
                if ref_loss is not None and "loss" in r
                else None,
            )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shape (CPU check)")
    args = ap.parse_args(argv)
    tiny = args.tiny or not torch.cuda.is_available()
    dtype = torch.float32 if not torch.cuda.is_available() else torch.bfloat16
    ceil = Ceilings.measure()
    print(
        f"measured matmul peak {ceil.matmul_tflops:.0f} TFLOP/s, copy {ceil.copy_gbps:.0f} GB/s", flush=True
    )
    rows = []
    for name, shape in (TINY if tiny else SHAPES).items():
        rows += run_shape(name, shape, dtype, ceil.matmul_tflops, tiny)
    cols = [
        "shape",
        "mode",
        "provider",
        "ms",
        "x_roofline",
        "x_naive",
        "x_liger",
        "tflops",
        "pct_peak",
        "peak_gib",
        "extra_excl_grads_gib",
        "loss_diff_vs_naive",
        "logp_max_diff_vs_naive",
        "status",
    ]
    table = Table(f"GRPO loss from hidden states ({dtype}, peak {ceil.matmul_tflops:.0f} TFLOP/s)", cols)
    for r in rows:
        table.add(*[("-" if r.get(c) is None else r.get(c)) for c in cols])
    ok = [r for r in rows if r["status"] == "ok"]
    png = os.path.join(out_dir(), "bench_grpo_loss.png")
    labels = [
        f"{r['shape'].split('_V')[0]} {'fwd+bwd' if r['mode'] == 'fwd+bwd' else 'fwd'} {r['provider']}"
        for r in ok
    ]
    bar_plot(
        png, "GRPO loss from hidden states: median ms (lower is better)", labels, [r["ms"] for r in ok], "ms"
    )
    finish(
        "bench_grpo_loss",
        [table],
        {"dtype": str(dtype), "matmul_tflops": ceil.matmul_tflops, "png": png, "rows": rows},
    )


if __name__ == "__main__":
    main()
