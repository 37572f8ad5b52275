"""Do model.precision fp8 and bf16 train the same thing? Three checks on one preset, per fp8 backend.

    python benchmarks/fp8_first_steps.py --preset small --steps 30

1. Same seed, same parameters: the fp8 model's parameters equal the bf16 model's bit for bit (conversion
   re-draws nothing) and the optimizer's parameter groups are the same.
2. Causality: changing tokens at positions >= t leaves the logits before t unchanged (max |change| is
   printed; bf16 gives the noise floor). A GEMM path that mixes tokens (a scale read from another row, a
   misplaced expert row) shows here.
3. Fresh uniformly random tokens every step: nothing is predictable, so a causal model's cross-entropy
   cannot go below ln(vocab); a model that sees later tokens can. The first-step CE and grad norm of fp8
   must be bf16's up to fp8 rounding.
Backends: `ref` (dequantize then matmul in fp32: the numerical specification) and, on a GPU, the
training path (torch's blockwise scaled_mm or Triton for linear layers, Triton for routed experts).

    python benchmarks/fp8_first_steps.py --preset small --diagnose

`--diagnose` runs only check 2 and says where a difference at earlier positions starts (issue 19): the first
block whose attention or FFN output there changes and by how much, and per MoE layer how many earlier tokens
changed their routed expert set and whether the experts' segment sizes changed. Variants: bf16; fp8 ref with
the experts' reference GEMM run per expert segment (the code before the fix: one fp32 GEMM whose M follows the
routing); fp8 ref as it is now (one GEMM shape per 128-row tile), also under a caller's TF32 setting; and on
a GPU the training path.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Table, finish

import r1core.kernels  # noqa: F401  (registers the MoE and FP8 ops)
from r1core.kernels import fp8
from r1core.model import MoE, Transformer, presets
from r1core.model.moe import moe_ops
from r1core.model.precision import Fp8GroupedExperts, Fp8Linear
from r1core.parallel.optim import param_groups


def build(args, precision: str, backend: str | None, dev: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    with dev:
        model = Transformer(args.replace(precision=precision))
    model = model.to(dtype)
    if backend:  # pin the fp8 backend of every converted module (the default is the training path)
        for m in model.modules():
            if isinstance(m, (Fp8Linear, Fp8GroupedExperts)):
                m.fp8_impl = backend
    return model


def token_pair(vocab: int, dev, t_cut: int, seq: int):
    g = torch.Generator(device=dev).manual_seed(1)
    tok = torch.randint(0, vocab, (2, seq), device=dev, generator=g)
    tok2 = tok.clone()
    tok2[:, t_cut:] = torch.randint(0, vocab, (2, seq - t_cut), device=dev, generator=g)
    return tok, tok2


def causality(model, vocab: int, dev, t_cut: int, seq: int) -> float:
    tok, tok2 = token_pair(vocab, dev, t_cut, seq)
    with torch.no_grad():
        a, b = model(tok)[:, :t_cut].float(), model(tok2)[:, :t_cut].float()
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- --diagnose (issue 19)


def _grouped_gemm_ref_per_segment(x_q, x_s, w_q, w_s, seg_E, out_dtype):
    """The experts' reference GEMM before issue 19's fix: one fp32 GEMM per expert segment, so its M (and
    with it the GEMM library's kernel choice) follows the routing of all tokens."""
    y = torch.zeros(x_q.shape[0], w_q.shape[1], dtype=out_dtype, device=x_q.device)
    start = 0
    for e, n in enumerate(seg_E.tolist()):
        if n:
            rows = slice(start, start + n)
            y[rows] = fp8.blockwise_gemm_ref(x_q[rows], x_s[rows], w_q[e], w_s[e], out_dtype)
        start += n
    return y


@contextlib.contextmanager
def _patched(per_segment: bool, fp32_precision: str):
    saved = fp8._grouped_gemm_ref, torch.get_float32_matmul_precision()
    if per_segment:
        fp8._grouped_gemm_ref = _grouped_gemm_ref_per_segment
    torch.set_float32_matmul_precision(fp32_precision)
    try:
        yield
    finally:
        fp8._grouped_gemm_ref = saved[0]
        torch.set_float32_matmul_precision(saved[1])


def _trace(model, tok, t_cut: int):
    """Logits, each block's attention and FFN outputs, each MoE layer's sorted expert set per token and
    segment sizes, all at positions < t_cut."""
    rec = {"attn": [], "ffn": [], "route": [], "seg": []}

    def keep(key):
        return lambda m, i, o: rec[key].append((o[0] if isinstance(o, tuple) else o)[:, :t_cut].float())

    def route(m, inp, out):
        x = inp[0]
        _, idx_TK, _ = moe_ops(m.impl).route(
            m.gate.logits(x.reshape(-1, x.shape[-1])), m.gate.e_score_correction_bias, m.gate.spec
        )
        rec["route"].append(idx_TK.view(*x.shape[:2], -1)[:, :t_cut].sort(-1).values)

    hooks = []
    for blk in model.layers.values():
        hooks += [blk.attn.register_forward_hook(keep("attn")), blk.ffn.register_forward_hook(keep("ffn"))]
        if isinstance(blk.ffn, MoE):
            hooks.append(blk.ffn.register_forward_hook(route))
            hooks.append(
                blk.ffn.experts.register_forward_hook(lambda m, i, o: rec["seg"].append(i[1].clone()))
            )
    try:
        with torch.no_grad():
            logits = model(tok)[:, :t_cut].float()
    finally:
        for h in hooks:
            h.remove()
    return logits, rec


def diagnose_one(model, vocab: int, dev, t_cut: int, seq: int) -> dict:
    tok, tok2 = token_pair(vocab, dev, t_cut, seq)
    (la, a), (lb, b) = _trace(model, tok, t_cut), _trace(model, tok2, t_cut)
    d_attn = [(x - y).abs().max().item() for x, y in zip(a["attn"], b["attn"])]
    d_ffn = [(x - y).abs().max().item() for x, y in zip(a["ffn"], b["ffn"])]
    first = next((i for i, (u, v) in enumerate(zip(d_attn, d_ffn)) if u or v), None)
    return {
        "leak": (la - lb).abs().max().item(),
        "first_block": first,
        "first_attn_diff": None if first is None else d_attn[first],
        "first_ffn_diff": None if first is None else d_ffn[first],
        "rerouted": [int((x != y).any(-1).sum()) for x, y in zip(a["route"], b["route"])],
        "seg_changed": sum(not torch.equal(x, y) for x, y in zip(a["seg"], b["seg"])),
        "n_moe": len(a["seg"]),
    }


def diagnose(a, args, dev, dtype) -> dict:
    variants = [
        ("bf16", "bf16", None, False, "highest"),
        ("fp8 ref, per-segment expert GEMMs (before the fix)", "fp8", "ref", True, "highest"),
        ("fp8 ref, per-tile expert GEMMs (now)", "fp8", "ref", False, "highest"),
        ("fp8 ref, per-tile, caller allows TF32", "fp8", "ref", False, "high"),
    ]
    if dev.type == "cuda":
        variants.append(("fp8 training path", "fp8", None, False, "highest"))
    t_cut = a.seq // 2
    table = Table(
        f"issue 19 diagnosis, {a.preset}, B2 x T{a.seq}, tokens from {t_cut} on changed",
        ["variant", "max |dlogit|", "first block differing", "its attn / ffn max |dh|",
         "earlier tokens re-routed per MoE layer", "MoE layers whose segment sizes changed"],
    )  # fmt: skip
    record = {"preset": a.preset, "t_cut": t_cut, "variants": {}}
    for name, precision, backend, per_segment, prec in variants:
        model = build(args, precision, backend, dev, dtype)
        with _patched(per_segment, prec):
            r = diagnose_one(model, args.vocab_size, dev, t_cut, a.seq)
        first = "none" if r["first_block"] is None else r["first_block"]
        diffs = "-" if r["first_block"] is None else f"{r['first_attn_diff']:.3g} / {r['first_ffn_diff']:.3g}"
        rerouted = ",".join(map(str, r["rerouted"])) + f" (of {2 * t_cut})"
        table.add(name, r["leak"], first, diffs, rerouted, f"{r['seg_changed']} of {r['n_moe']}")
        record["variants"][name] = r
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    finish("fp8_leak_diagnosis", [table], record)
    return record


def random_token_training(model, vocab: int, dev, steps: int, batch: int, seq: int, lr: float):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(param_groups(named, 0.1), lr=lr, betas=(0.9, 0.95))
    g = torch.Generator(device=dev).manual_seed(2)
    ces, norms = [], []
    for step in range(steps):
        tok = torch.randint(0, vocab, (batch, seq + 1), device=dev, generator=g)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 5)
        out = model.compute_loss(tok[:, :-1], tok[:, 1:])
        out.loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
        ces.append(out.ce.item())
    return ces, norms


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--moe-inter-dim", type=int, default=0, help="override (tiny: 128, so experts run fp8)")
    p.add_argument("--diagnose", action="store_true", help="only where an earlier-position difference starts")
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    args = presets[a.preset]
    if a.moe_inter_dim:
        args = args.replace(moe_inter_dim=a.moe_inter_dim)
    if dev.type == "cuda":
        args = args.replace(moe_impl="triton")
    if a.diagnose:
        return diagnose(a, args, dev, dtype)
    variants = [("bf16", "bf16", None), ("fp8 ref", "fp8", "ref")]
    if dev.type == "cuda":
        variants.append(("fp8 training path", "fp8", None))
    ref_params, ref_groups = None, None
    table = Table(
        f"fp8 vs bf16, {a.preset}, B{a.batch} x T{a.seq}, fresh random tokens (ln V = "
        f"{math.log(args.vocab_size):.3f}), lr {a.lr}",
        [
            "variant",
            "params = bf16's",
            "groups = bf16's",
            "causal leak (max |dlogit|)",
            "CE step 1",
            "grad norm step 1",
            f"CE step {a.steps}",
            "min CE - ln V",
        ],
    )
    record = {"preset": a.preset, "ln_vocab": math.log(args.vocab_size), "variants": {}}
    for name, precision, backend in variants:
        model = build(args, precision, backend, dev, dtype)
        named = list(model.named_parameters())
        if ref_params is None:
            ref_params = {n: p.detach().clone() for n, p in named}
            ref_groups = [
                [n for n, q in named if any(q is x for x in g["params"])] for g in param_groups(named, 0.1)
            ]
        same = all(torch.equal(p, ref_params[n]) for n, p in named) and len(named) == len(ref_params)
        groups = [[n for n, q in named if any(q is x for x in g["params"])] for g in param_groups(named, 0.1)]
        leak = causality(model, args.vocab_size, dev, a.seq // 2, a.seq)
        ces, norms = random_token_training(model, args.vocab_size, dev, a.steps, a.batch, a.seq, a.lr)
        excess = min(ces) - math.log(args.vocab_size)
        table.add(name, same, groups == ref_groups, leak, ces[0], norms[0], ces[-1], excess)
        record["variants"][name] = {
            "params_equal": same,
            "groups_equal": groups == ref_groups,
            "causal_leak": leak,
            "ce": ces,
            "grad_norm": norms,
        }
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    finish("fp8_first_steps", [table], record)
    return record


if __name__ == "__main__":
    main()
