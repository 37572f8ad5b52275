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
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Table, finish

import r1core.kernels  # noqa: F401  (registers the MoE and FP8 ops)
from r1core.model import Transformer, presets
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


def causality(model, vocab: int, dev, t_cut: int, seq: int) -> float:
    g = torch.Generator(device=dev).manual_seed(1)
    tok = torch.randint(0, vocab, (2, seq), device=dev, generator=g)
    tok2 = tok.clone()
    tok2[:, t_cut:] = torch.randint(0, vocab, (2, seq - t_cut), device=dev, generator=g)
    with torch.no_grad():
        a, b = model(tok)[:, :t_cut].float(), model(tok2)[:, :t_cut].float()
    return (a - b).abs().max().item()


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
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    args = presets[a.preset]
    if a.moe_inter_dim:
        args = args.replace(moe_inter_dim=a.moe_inter_dim)
    if dev.type == "cuda":
        args = args.replace(moe_impl="triton")
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
