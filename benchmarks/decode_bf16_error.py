"""How far the built-in engine's bf16 log-probs lie from the fp32 model's, per decode path (issue 16).

    python benchmarks/decode_bf16_error.py --seeds 5-12

The bf16 compiled-decode GPU test samples 16 tokens for five prompts from a random 4-layer tiny model and
compares the compiled engine's log-probs with the uncompiled engine's. With r1core's MLA decode kernel one of
80 log-probs once differed by 0.147 (11i). Is that the kernel, the compiler, or bf16 itself? Here every
engine's sampled tokens are scored again by the fp32 model (teacher forcing, one forward over prompt +
response), and each engine's log-probs are compared with those: the error of a decode path against the
exact value, not against another rounded path. Paths: PyTorch attention or the kernel, uncompiled or
compiled; and the bf16 model's own full forward over the same tokens (bf16 without any decode path) as the
floor, split by whether some MoE layer chose other experts than the fp32 model did at the token's position
or before it (a near-tie in routing that bf16 rounding tips: the layer's output then changes by a whole
expert's contribution, not by rounding). Per path: the max, 99th percentile and mean error over every sampled
token of every seed, and per seed the largest difference between compiled and uncompiled log-probs before
their samples part.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Table, finish

from r1core.model import Transformer, presets
from r1core.model.moe import route_ref
from r1core.rollout import BuiltinEngine, SamplingParams
from r1core.testing import teacher_forced_logprobs

PROMPTS = [[5, 17, 99, 3, 250, 8], [42, 7], [300, 301, 302, 303, 304, 305, 306, 307, 308], [11], [60, 61, 62]]


def _models(n_layers: int, device: str) -> tuple[Transformer, Transformer]:
    """The test's model: fp32 (the exact reference) and its bf16 copy with an fp32 router bias."""
    torch.manual_seed(1234)
    args = dataclasses.replace(presets["tiny"], n_layers=n_layers, n_mtp_modules=0)
    fp32 = Transformer(args).to(device).eval()
    bf16 = Transformer(args).to(device).eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    for moe in bf16.moe_layers():
        moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    return fp32, bf16


def teacher_forced(model: Transformer, prompt: list[int], response: list[int], routes: list) -> torch.Tensor:
    """The model's log-probs of the response (teacher forcing); each MoE layer's chosen experts [T, K]
    (sorted) are appended to `routes`."""

    def keep(module, inputs):
        x_TD = inputs[0].reshape(-1, inputs[0].shape[-1])
        gate = module.gate
        _, idx_TK, _ = route_ref(gate.logits(x_TD), gate.e_score_correction_bias, gate.spec)
        routes.append(idx_TK.sort(-1).values.cpu())

    hooks = [moe.register_forward_pre_hook(keep) for moe in model.moe_layers()]
    try:
        return teacher_forced_logprobs(model, prompt, response)
    finally:
        for h in hooks:
            h.remove()


def unflipped(prompt: list[int], a: list, b: list) -> torch.Tensor:
    """[response] True where no MoE layer chose other experts in a than in b at this token's position or
    before it (attention carries an earlier flip forward)."""
    flip_T = torch.stack([(x != y).any(-1) for x, y in zip(a, b, strict=True)]).any(0)
    seen_T = flip_T.cumsum(0) > 0
    return ~seen_T[len(prompt) - 1 : -1]


def _parse_seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def _stats(errors: list[torch.Tensor]) -> dict:
    e = torch.cat(errors)
    if not e.numel():
        return {"max": None, "p99": None, "mean": None, "n": 0}
    return {"max": e.max().item(), "p99": e.quantile(0.99).item(), "mean": e.mean().item(), "n": e.numel()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="5-12", help="sampling seeds, LO-HI (the GPU test uses 5)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-new", type=int, default=16)
    p.add_argument("--kernel", default="off,on", help="mla_kernel settings to run: off, on or off,on")
    p.add_argument("--compile", default="off,on", help="compile_decode settings to run")
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fp32, bf16 = _models(args.layers, dev)
    seeds = _parse_seeds(args.seeds)
    paths = [(k, c) for k in args.kernel.split(",") for c in args.compile.split(",")]
    errors: dict[str, list[torch.Tensor]] = {
        "bf16 full forward": [],
        "bf16 full forward, no expert flipped": [],
        "bf16 full forward, an expert flipped": [],
    }
    rollouts: dict[tuple[str, str], dict[int, list]] = {}
    for kernel, comp in paths:
        engine = BuiltinEngine(
            bf16, max_batch=8, max_len=64, decode_moe="grouped",
            compile_decode=comp == "on", mla_kernel=kernel == "on",
        )  # fmt: skip
        name = f"kernel {kernel}, compile {comp}"
        errors[name], rollouts[kernel, comp] = [], {}
        for seed in seeds:
            sp = SamplingParams(temperature=1.0, max_new_tokens=args.max_new, seed=seed)
            out = engine.generate(PROMPTS, 1, sp)
            rollouts[kernel, comp][seed] = out
            for s in out:
                r32, r16 = [], []
                exact = teacher_forced(fp32, s.prompt_ids, s.response_ids, r32)
                errors[name].append((torch.tensor(s.logprobs) - exact).abs())
                if (kernel, comp) == paths[0]:
                    err = (teacher_forced(bf16, s.prompt_ids, s.response_ids, r16) - exact).abs()
                    clean = unflipped(s.prompt_ids, r32, r16)
                    errors["bf16 full forward"].append(err)
                    errors["bf16 full forward, no expert flipped"].append(err[clean])
                    errors["bf16 full forward, an expert flipped"].append(err[~clean])
        st = {k: engine.stats.get(k) for k in ("decode_compiles", "compile_error")}
        print(f"[path] {name}: {_stats(errors[name])} engine {st}", flush=True)
    table = Table(
        f"bf16 log-probs against the fp32 model's on the same tokens ({len(seeds)} seeds, 5 prompts)",
        ["path", "max |err|", "p99 |err|", "mean |err|", "tokens"],
    )
    record = {"seeds": seeds, "paths": {}}
    for name, errs in errors.items():
        st = _stats(errs)
        record["paths"][name] = st
        table.add(name, st["max"], st["p99"], st["mean"], st["n"])
    pairs = Table(
        "compiled against uncompiled, same kernel setting: before their samples part",
        ["kernel", "seed", "max |diff|", "tokens agreed"],
    )
    for kernel in args.kernel.split(","):
        if (kernel, "on") not in rollouts or (kernel, "off") not in rollouts:
            continue
        for seed in seeds:
            worst, agreed = 0.0, 0
            for a, b in zip(rollouts[kernel, "off"][seed], rollouts[kernel, "on"][seed], strict=True):
                n = next(
                    (i for i, (x, y) in enumerate(zip(a.response_ids, b.response_ids)) if x != y),
                    len(a.response_ids),
                )
                agreed += n
                if n:
                    worst = max(
                        worst,
                        (torch.tensor(a.logprobs[:n]) - torch.tensor(b.logprobs[:n])).abs().max().item(),
                    )
            pairs.add(kernel, seed, worst, agreed)
            record.setdefault("pairs", []).append(
                {"kernel": kernel, "seed": seed, "max_diff": worst, "agreed": agreed}
            )
    finish("decode_bf16_error", [table, pairs], record)
    return record


if __name__ == "__main__":
    main()
