"""Decode roofline and GRPO-shaped workloads for bench_rollout.py.

Decode is memory-bound at rollout batch sizes, so its ceiling is bytes over bandwidth. One decode
step of B rows must read at least:
- every attention weight of every layer (MLA projections and norms), every dense FFN and every shared
  expert, the router weights, the final norm and the output head (V x D);
- the routed experts the batch visits: per MoE layer, the number of distinct experts among the B x K
  routed slots, measured by recording the routing of one decode step of the run (for uniform routing
  this is E (1 - (1 - K/E)^B), printed beside it);
- B embedding rows;
- the latent KV cache of every row at its current length (kv_lora_rank + rope dims per token and layer).
The roofline step time is those bytes over the copy bandwidth measured in the same run (a large
device-to-device copy, read + written bytes per second), and % of roofline is measured decode
tokens/s over B / that time. Decode time is isolated from prefill as t(N new tokens) - t(1 new token)
with the same prompts.

The GRPO workload is P prompts x G samples with prompt lengths drawn around the bench's prompt length
and responses that stop on "EOS" with a mean length near `mean_len`: with random weights the next-token
distribution is nearly flat, so a stop set of V / mean_len token ids gives geometric lengths, the long
tail included (capped by max_new_tokens), as in real RL where the slowest sample sets the step.
"""

from __future__ import annotations

import copy
import time

import torch

from r1core.model import MoE, Transformer
from r1core.rollout import BuiltinEngine, SamplingParams
from r1core.rollout import decode as decode_mod


def _nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.parameters())


def record_routing(engine: BuiltinEngine, B: int) -> list[int]:
    """Distinct routed experts per MoE layer in one eager decode step of rows [0, B) (current state)."""
    seen: list[int] = []
    real = decode_mod.route_topk

    def recording(logits_TE, bias_E, spec):
        weights_TK, idx_TK = real(logits_TE, bias_E, spec)
        seen.append(int(idx_TK.unique().numel()))
        return weights_TK, idx_TK

    decode_mod.route_topk = recording
    try:
        with torch.no_grad():
            engine._step.logits(B, engine.max_len)
    finally:
        decode_mod.route_topk = real
    return seen


def decode_bytes(
    model: Transformer, B: int, ctx_len: float, distinct: list[float], kv_bytes_per_token: int
) -> dict:
    """Bytes one decode step of B rows at mean context ctx_len must read (see the module docstring)."""
    a = model.args
    parts = {
        "head": _nbytes(model.head) + _nbytes(model.norm),
        "embed": B * a.dim * model.embed.weight.element_size(),
        "attn": 0,
        "dense_ffn": 0,
        "shared": 0,
        "router": 0,
        "routed": 0.0,
    }
    moe_i = 0
    for block in model.layers.values():
        parts["attn"] += _nbytes(block.attn) + _nbytes(block.attn_norm) + _nbytes(block.ffn_norm)
        ffn = block.ffn
        if isinstance(ffn, MoE):
            parts["router"] += _nbytes(ffn.gate)
            parts["shared"] += _nbytes(ffn.shared_experts) if ffn.shared_experts is not None else 0
            per_expert = _nbytes(ffn.experts) / a.n_routed_experts
            parts["routed"] += distinct[moe_i] * per_expert
            moe_i += 1
        else:
            parts["dense_ffn"] += _nbytes(ffn)
    parts["kv"] = B * ctx_len * kv_bytes_per_token
    parts["total"] = sum(parts.values())
    return parts


def uniform_distinct(n_experts: int, top_k: int, tokens: int) -> float:
    return n_experts * (1 - (1 - top_k / n_experts) ** tokens)


def _gen_seconds(engine: BuiltinEngine, prompts, sp: SamplingParams, repeats: int, sync, n: int = 1) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        engine.generate(prompts, n, sp)
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def roofline_row(
    model: Transformer,
    B: int,
    prompt_len: int,
    new_tokens: int,
    decode_moe: str,
    copy_gbps: float,
    repeats: int,
    sync,
    compile_decode: bool = False,
    mla_kernel: bool = False,
) -> dict:
    """Decode tokens/s of B rows x new_tokens and its share of the decode roofline.

    The first, untimed run captures the graphs of every bucket the run visits (and, with compile_decode,
    compiles the step first): its seconds, the compile and the capture time are reported apart."""
    dev = model.head.weight.device
    gen = torch.Generator().manual_seed(B)
    prompts = torch.randint(0, model.args.vocab_size, (B, prompt_len), generator=gen).tolist()
    engine = BuiltinEngine(
        model,
        max_batch=B,
        max_len=prompt_len + new_tokens,
        decode_moe=decode_moe,
        compile_decode=compile_decode,
        mla_kernel=mla_kernel,
    )
    sp = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, seed=0)
    one = SamplingParams(temperature=1.0, max_new_tokens=1, seed=0)
    warmup_s = _gen_seconds(engine, prompts, sp, 1, sync)
    setup = {
        k: engine.stats[k] for k in ("decode_compiles", "decode_compile_s", "capture_s", "graphs_captured")
    }
    t_full = _gen_seconds(engine, prompts, sp, repeats, sync)
    t_one = _gen_seconds(engine, prompts, one, repeats, sync)
    distinct = record_routing(engine, B)
    t_dec = t_full - t_one
    if t_dec <= 0:  # noise larger than the decode time (a loaded CPU): no figure rather than a wrong one
        t_dec = float("nan")
    dec_tok_s = B * (new_tokens - 1) / t_dec
    ctx = prompt_len + new_tokens / 2
    parts = decode_bytes(model, B, ctx, distinct, engine.kv_cache_bytes_per_token())
    roof_step_s = parts["total"] / (copy_gbps * 1e9)
    roof_tok_s = B / roof_step_s
    row = {
        "batch": B,
        "decode_moe": decode_moe,
        "compile_decode": compile_decode,
        "warmup_s": warmup_s,
        "compile_s": setup["decode_compile_s"],
        "compiles": setup["decode_compiles"],
        "capture_s": setup["capture_s"],
        # compiles and captures inside the timed runs: 0 when the warm-up visited every bucket
        "compiles_timed": engine.stats["decode_compiles"] - setup["decode_compiles"],
        "graphs_captured_timed": engine.stats["graphs_captured"] - setup["graphs_captured"],
        "seconds": t_full,
        "tokens_per_s": B * new_tokens / t_full,
        "decode_tokens_per_s": dec_tok_s,
        "decode_step_ms": t_dec / (new_tokens - 1) * 1e3,
        "roofline_step_ms": roof_step_s * 1e3,
        "roofline_tokens_per_s": roof_tok_s,
        "pct_roofline": 100 * dec_tok_s / roof_tok_s,
        "bytes_per_step": parts,
        "distinct_experts_measured": sum(distinct) / max(len(distinct), 1),
        "distinct_experts_uniform": uniform_distinct(
            model.args.n_routed_experts, model.args.n_activated_experts, B
        ),
        "graphs": engine.stats["graphs_captured"],
        "graph_error": engine.stats.get("graph_error"),
        "compile_error": engine.stats.get("compile_error"),
        "decode_compiled": engine.stats.get("decode_compiled", "none"),  # step, layers (fallback) or none
        "compile_error_layers": engine.stats.get("compile_error_layers"),
    }
    del engine
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


def grpo_prompts(n_prompts: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Prompts of lengths spread over [prompt_len / 2, 3 prompt_len / 2] (math problems vary in length)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(prompt_len // 2, 1), prompt_len * 3 // 2 + 1, (n_prompts,), generator=gen)
    return [torch.randint(1, vocab, (int(n),), generator=gen).tolist() for n in lens]


def grpo_engine(
    model: Transformer,
    prompt_len: int,
    max_new: int,
    max_batch: int,
    share_prefill: bool,
    decode_moe: str,
    admit_min: int,
    compile_decode: bool = False,
    compact_rows: bool | None = None,
) -> BuiltinEngine:
    """The engine of grpo_row, sized for every prompt grpo_prompts draws at this prompt_len."""
    return BuiltinEngine(
        model,
        max_batch=max_batch,
        max_len=prompt_len * 3 // 2 + max_new,
        decode_moe=decode_moe,
        share_prefill=share_prefill,
        admit_min=admit_min,
        compile_decode=compile_decode,
        compact_rows=compact_rows,
    )


def grpo_row(
    model: Transformer,
    n_prompts: int,
    group: int,
    prompt_len: int,
    mean_len: int,
    max_new: int,
    max_batch: int,
    share_prefill: bool,
    decode_moe: str,
    repeats: int,
    sync,
    admit_min: int = 1,
    engine: BuiltinEngine | None = None,
    compile_decode: bool = False,
) -> dict:
    """Mean rollout seconds per sample for n_prompts x group with EOS-like stops (mean length ~mean_len).

    A fresh engine runs the workload once untimed first (graph captures). A passed `engine` (built by
    grpo_engine with these settings) is warmed only if it has never generated: a smaller workload run
    before on it has captured most buckets, and the few new ones are captured inside the timed run."""
    V = model.args.vocab_size
    prompts = grpo_prompts(n_prompts, prompt_len, V)
    stop_ids = list(range(0, V, max(mean_len, 1)))  # P(stop) ~ 1 / mean_len per token under flat logits
    sp = SamplingParams(temperature=1.0, max_new_tokens=max_new, stop_token_ids=stop_ids, seed=0)
    if engine is None:
        engine = grpo_engine(
            model, prompt_len, max_new, max_batch, share_prefill, decode_moe, admit_min, compile_decode
        )
    warmup_s = 0.0
    if engine.stats["decode_steps"] == 0:
        warmup_s = _gen_seconds(engine, prompts, sp, 1, sync, group)  # warm-up: graph captures, compiles
    for k in (
        "host_s",
        "wait_s",
        "prefill_rows",
        "prefill_rows_shared",
        "decode_steps",
        "prefills",
        "rows_moved",
    ):
        engine.stats[k] = 0
    captured, compiled = engine.stats["graphs_captured"], engine.stats["decode_compiles"]
    compile_s = engine.stats["decode_compile_s"]
    secs = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        samples = engine.generate(prompts, group, sp)
        sync()
        secs.append(time.perf_counter() - t0)
    sec = sorted(secs)[len(secs) // 2]
    n = len(samples)
    lens = [len(s.response_ids) for s in samples]
    st = engine.stats
    row = {
        "prompts": n_prompts,
        "group": group,
        "share_prefill": share_prefill,
        "decode_moe": decode_moe,
        "admit_min": admit_min,
        "prefills": st["prefills"] / repeats,
        "seconds": sec,
        "ms_per_sample": 1e3 * sec / n,
        "tokens_per_s": sum(lens) / sec,
        "mean_len": sum(lens) / n,
        "max_len": max(lens),
        "decode_steps": st["decode_steps"] / repeats,
        "rows_moved": st["rows_moved"] / repeats,
        "host_s": st["host_s"] / repeats,
        "wait_s": st["wait_s"] / repeats,
        "prefill_rows": st["prefill_rows"] / repeats,
        "prefill_rows_shared": st["prefill_rows_shared"] / repeats,
        "graphs_captured_timed": st["graphs_captured"] - captured,
        "compile_decode": engine.compile_backend is not None,
        "warmup_s": warmup_s,
        "compile_s": compile_s,  # the engine's compile time so far (warm-ups of smaller workloads included)
        "compiles_timed": st["decode_compiles"] - compiled,
        "compile_error": st.get("compile_error"),
        "decode_compiled": st.get("decode_compiled", "none"),
    }
    return row


def refresh_row(model: Transformer, sync, repeats: int = 3) -> dict:
    """Seconds of BuiltinEngine.update_weights from a separate trainer copy (what a non-colocated engine pays;
    a colocated engine shares the trainer's module and pays nothing)."""
    trainer = copy.deepcopy(
        model
    )  # the trainer's module: bf16 weights (its fp32 masters live in the optimizer)
    engine = BuiltinEngine(model, max_batch=1, max_len=8)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        engine.update_weights(trainer)
        sync()
        times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    del trainer, engine
    return {"seconds": sec, "bytes": n_bytes, "gbps": 2 * n_bytes / sec / 1e9}


def profile_decode(
    model: Transformer,
    B: int,
    prompt_len: int,
    decode_moe: str,
    top: int = 15,
    replays: int = 5,
    compile_decode: bool = False,
    mla_kernel: bool = False,
) -> dict:
    """Top kernels of decode steps of B rows at a key bucket just above prompt_len: CUDA graph replays
    (CUPTI traces each kernel of the graph) or, where no graph was captured, eager steps (on the CPU:
    its ops, so the path runs in tests). Returns {"kernels": [(name, ms per step, % of step)], "step_ms":
    device ms per step, "launches": kernels (ops) per step, "S": key bucket, "table": profiler table}."""
    from torch.profiler import ProfilerActivity, profile

    cuda = model.head.weight.device.type == "cuda"
    gen = torch.Generator().manual_seed(B)
    prompts = torch.randint(0, model.args.vocab_size, (B, prompt_len), generator=gen).tolist()
    engine = BuiltinEngine(
        model,
        max_batch=B,
        max_len=prompt_len + 8,
        decode_moe=decode_moe,
        compile_decode=compile_decode,
        mla_kernel=mla_kernel,
    )
    engine.generate(prompts, 1, SamplingParams(temperature=1.0, max_new_tokens=4, seed=0))  # graph capture
    S = max(k[1] for k in engine._graphs) if engine._graphs else prompt_len + 4
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    with profile(activities=activities) as prof, torch.no_grad():
        for _ in range(replays):
            engine._decode(B, S, False)
        sync()
    events = [
        e for e in prof.key_averages() if e.device_type == kind or (cuda and e.self_device_time_total > 0)
    ]

    def self_us(e) -> float:
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    total_us = sum(self_us(e) for e in events) or float("nan")
    events.sort(key=lambda e: -self_us(e))
    kernels = [(e.key[:90], self_us(e) / replays / 1e3, 100 * self_us(e) / total_us) for e in events[:top]]
    table = prof.key_averages().table(
        sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
        row_limit=top,
        max_name_column_width=70,
    )
    out = {
        "batch": B,
        "S": S,
        "decode_moe": decode_moe,
        "compile_decode": compile_decode,
        "graphs": len(engine._graphs),
        "step_ms": total_us / replays / 1e3,
        "launches": sum(e.count for e in events) / replays,
        "kernels": kernels,
        "table": table,
    }
    del engine
    if cuda:
        torch.cuda.empty_cache()
    return out
