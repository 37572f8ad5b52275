"""Rollout throughput: r1core's BuiltinEngine vs HF transformers' DeepseekV3ForCausalLM.generate.

Same model and weights for both: an r1core Transformer is exported with `save_pretrained` (HF
DeepSeek-V3 layout) and loaded back by transformers. Workload (FACTS.md anchor): hidden 1024,
8 layers, MLA, 32 routed experts top-4, vocab 32768; batch 64, 128-token prompts, 256 new tokens,
pure sampling (temperature 1, no top-k / top-p, no stop), so every request generates exactly 256
tokens in both engines. Reported: generated tokens/s per provider, the ratio to HF, peak memory,
KV-cache bytes per token (ours: the MLA latent; HF: its DynamicCache, measured), and a
greedy parity check (share of greedy tokens on which the two engines agree).

Then (rollout_roofline.py) the decode roofline sweep: per model (the bench shapes above and the
`small` preset) and batch size (64, 256, 1024), decode tokens/s and % of the decode roofline (bytes
a step must read over the copy bandwidth measured in this run) for each graph-safe MoE path; the
GRPO-shaped workload (prompts x group size, EOS-like stops), mean rollout ms per sample with and
without shared prefill; and the weight refresh cost of a non-colocated engine.

  python benchmarks/bench_rollout.py            # GPU, the anchor workload, sweep, GRPO rows
  python benchmarks/bench_rollout.py --tiny     # CPU smoke run (tiny preset, small batch)
  python benchmarks/bench_rollout.py --repeats 1 --variants graphs,triton \
      --sweep-presets bench:256,small:64:256:1024 --sweep-moe auto --grpo 32x8,128x8 \
      --grpo-configs old,admit --profile small:256:auto   # the compact run
  python benchmarks/bench_rollout.py --variants '' --skip-hf --sweep-presets small:256:64:1024 \
      --sweep-moe auto --sweep-compile off,on --grpo ''   # the compiled decode step against today's

With --sweep-compile off,on every roofline row runs twice in the same run, the decode step op by op and
torch.compiled (compile_decode), and the ratio on/off is printed. Compile and capture happen in an untimed
first run whose seconds, compile seconds and capture seconds are reported apart from the timed decode.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Ceilings, Table, bar_plot, device, error_report, finish, out_dir, sync  # noqa: E402
from rollout_roofline import grpo_engine, grpo_row, profile_decode, refresh_row, roofline_row  # noqa: E402

from r1core.checkpoint.hf import save_pretrained  # noqa: E402
from r1core.model import ModelArgs, Transformer, presets  # noqa: E402
from r1core.rollout import BuiltinEngine, SamplingParams  # noqa: E402


def anchor_args() -> ModelArgs:
    # 32 experts of 512 + 1 shared expert, all layers MoE: ~0.5B parameters like the megatron anchor.
    return ModelArgs(
        vocab_size=32768,
        dim=1024,
        inter_dim=2816,
        moe_inter_dim=512,
        n_layers=8,
        n_dense_layers=0,
        n_heads=16,
        n_routed_experts=32,
        n_shared_experts=1,
        n_activated_experts=4,
        n_expert_groups=4,
        n_limited_groups=2,
        q_lora_rank=512,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        max_seq_len=4096,
        original_seq_len=4096,
        rope_factor=1.0,
        n_mtp_modules=0,
    )


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of fn over `repeats` runs, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def peak_gib(fn) -> tuple[float, object]:
    if not torch.cuda.is_available():
        return 0.0, fn()
    sync()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    sync()
    return torch.cuda.max_memory_allocated() / 2**30, out


def load_hf(model: Transformer, dtype: torch.dtype, dev: torch.device):
    import transformers

    transformers.logging.set_verbosity_error()  # the tiny preset's MTP layer is "unexpected" to HF
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=dtype)
    return hf.to(dev).eval()


def hf_generate(hf, prompts: torch.Tensor, new_tokens: int, do_sample: bool = True, **kw):
    # top_k=0 explicitly: older generation configs default to top-k 50. min_new_tokens and no eos:
    # every row generates exactly new_tokens, as in our engine without a tokenizer.
    if do_sample:
        kw.update(temperature=1.0, top_k=0, top_p=1.0)
    return hf.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=do_sample,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
        eos_token_id=None,
        **kw,
    )


def hf_kv_bytes_per_token(hf, prompts: torch.Tensor) -> int:
    """Bytes of HF's KV cache per token, measured on a short generate."""
    out = hf_generate(hf, prompts[:1, :8], 2, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    tensors = [
        t
        for layer in getattr(cache, "layers", [])
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    ]
    seq = max(t.shape[-2] for t in tensors)
    return sum(t.numel() * t.element_size() for t in tensors) // seq


def greedy_agreement(engine: BuiltinEngine, hf, prompts: torch.Tensor, steps: int) -> float:
    """Share of positions where both engines' greedy continuations agree, up to the first divergence."""
    ours = engine.generate(prompts.tolist(), 1, SamplingParams(temperature=0, max_new_tokens=steps))
    theirs = hf_generate(hf, prompts, steps, do_sample=False)[:, prompts.shape[1] :].tolist()
    agree = 0
    for s, t in zip(ours, theirs):
        agree += next((i for i, (a, b) in enumerate(zip(s.response_ids, t)) if a != b), steps)
    return agree / (steps * len(ours))


def run_ours(name, engine: BuiltinEngine, prompts: list[list[int]], sp: SamplingParams, repeats: int):
    warm_s, _ = timed(lambda: engine.generate(prompts, 1, sp), 1)  # captures the CUDA graphs
    peak, _ = peak_gib(lambda: engine.generate(prompts, 1, sp))
    sec, samples = timed(lambda: engine.generate(prompts, 1, sp), repeats)
    n_tok = sum(len(s.response_ids) for s in samples)
    print(
        f"[{name}] first call {warm_s:.2f}s, median {sec:.3f}s, {n_tok / sec:,.0f} tok/s, {engine.stats}",
        flush=True,
    )
    return {
        "seconds": sec,
        "tokens": n_tok,
        "tokens_per_s": n_tok / sec,
        "peak_gib": peak,
        "first_call_s": warm_s,
        "graphs": engine.stats["graphs_captured"],
        "graph_error": engine.stats.get("graph_error"),
        "decode_steps_per_call": engine.stats["decode_steps"] // (repeats + 2),
    }


def run_hf(model, dtype, dev, prompts, engine, opts, record) -> dict:
    hf = load_hf(model, dtype, dev)
    record["hf_experts_implementation"] = str(getattr(hf.config, "_experts_implementation", None))
    try:
        record["kv_bytes_per_token_hf"] = hf_kv_bytes_per_token(hf, prompts)
    except (AttributeError, ValueError) as e:  # cache layout differs between transformers versions
        record["kv_bytes_per_token_hf_error"] = str(e)[:200]
    record["greedy_agreement_vs_hf"] = greedy_agreement(engine, hf, prompts[:8], 32)
    print(f"greedy agreement vs HF: {record['greedy_agreement_vs_hf']:.3f}", flush=True)
    hf_generate(hf, prompts[:, :16], 4)  # warm-up
    peak, (sec, out) = peak_gib(lambda: timed(lambda: hf_generate(hf, prompts, opts.new_tokens), 1))
    n_tok = (out.shape[1] - opts.prompt_len) * out.shape[0]
    print(f"[HF] {sec:.2f}s, {n_tok / sec:,.0f} tok/s", flush=True)
    return {"seconds": sec, "tokens": n_tok, "tokens_per_s": n_tok / sec, "peak_gib": peak}


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny preset, small batch: a CPU smoke run")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument(
        "--variants",
        default="graphs,grouped,eager,triton",
        help="ours: graphs (CUDA graphs, dense MoE), grouped (graphs, torch._grouped_mm MoE), "
        "eager (no graphs), triton (graphs, the model's MoE on the Triton kernels)",
    )
    ap.add_argument(
        "--sweep-presets",
        default="bench,small",
        help="models of the roofline sweep ('' skips it); a model may name its own batch sizes: "
        "bench:256,small:64:256:1024",
    )
    ap.add_argument("--sweep-batches", default="64,256,1024")
    ap.add_argument(
        "--sweep-moe",
        default="dense,grouped",
        help="decode_moe paths of the sweep (auto: dense up to 128 rows, grouped above)",
    )
    ap.add_argument("--sweep-new-tokens", type=int, default=128)
    ap.add_argument(
        "--sweep-compile",
        default="off",
        help="compile_decode settings of each roofline row: off, on, or off,on (both in the same run)",
    )
    ap.add_argument("--grpo", default="32x8,128x8", help="GRPO workloads, prompts x group ('' skips them)")
    ap.add_argument("--grpo-mean-len", type=int, default=128, help="mean response length (EOS-like stops)")
    ap.add_argument("--grpo-max-new", type=int, default=512)
    ap.add_argument("--grpo-max-batch", type=int, default=256, help="engine rows, as the pipeline's rollout")
    ap.add_argument(
        "--grpo-configs",
        default="old,shared,auto,admit",
        help="GRPO engine settings per workload: old (no shared prefill, dense), "
        "shared (+ shared prefill), auto (+ decode_moe auto), admit_fixed (+ admit_min=G), "
        "admit (+ compact_rows: the pipeline's engine), compiled (admit + compile_decode)",
    )
    ap.add_argument(
        "--profile",
        default="",
        metavar="PRESET:B:MOE[:on]",
        help="GPU: top kernels of decode graph replays, e.g. small:256:auto, or small:256:auto:on for the "
        "compiled step ('' skips it)",
    )
    ap.add_argument("--profile-top", type=int, default=15, help="kernels --profile lists")
    ap.add_argument(
        "--mla-kernel",
        choices=("on", "off"),
        default="on",
        help="decode attention of the roofline and --profile rows: r1core's Triton kernel (on, as "
        "rollout.builtin.mla_kernel's default) or PyTorch's batched GEMMs (off)",
    )
    ap.add_argument(
        "--expert-order",
        choices=("count", "sort"),
        default="count",
        help="how decode's grouped MoE orders the routed rows: count (the engine's counting sort over the "
        "experts) or sort (torch.sort, the engine before 116aaf4), to measure one against the other",
    )
    args = ap.parse_args()
    bad = set(filter(None, args.grpo_configs.split(","))) - set(GRPO_CONFIGS)
    if bad:
        ap.error(f"--grpo-configs: unknown {sorted(bad)}; choose from {', '.join(GRPO_CONFIGS)}")
    compile_modes = args.sweep_compile.split(",")
    if not compile_modes or set(compile_modes) - {"off", "on"}:
        ap.error(f"--sweep-compile={args.sweep_compile}: choose off, on or off,on")
    if args.tiny:
        args.batch, args.prompt_len, args.new_tokens, args.repeats = 4, 16, 16, 1
        args.sweep_presets, args.sweep_batches, args.sweep_new_tokens = "tiny", "2,8", 6
        args.grpo, args.grpo_mean_len, args.grpo_max_new, args.grpo_max_batch = "2x4", 4, 8, 4
    return args


def build_model(margs: ModelArgs, dev: torch.device, dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(margs).to(dtype).eval()
    for moe in model.moe_layers():  # routing fidelity: the router bias stays fp32, as in training
        moe.gate.e_score_correction_bias.data = moe.gate.e_score_correction_bias.float()
    return model


def sweep_args(name: str) -> ModelArgs:
    margs = anchor_args() if name == "bench" else presets[name]
    margs.n_mtp_modules = 0  # rollout never runs MTP
    return margs


# --grpo-configs: (shared prefill, decode_moe, admit_min (None: G), compile_decode, compact_rows)
GRPO_CONFIGS = {
    "old": (False, "dense", 0, False, False),
    "shared": (True, "dense", 0, False, False),
    "auto": (True, "auto", 0, False, False),
    "admit_fixed": (True, "auto", None, False, False),  # 11e's "admit": rows never move
    "admit": (True, "auto", None, False, True),
    "compiled": (True, "auto", None, True, True),
}


def roofline_sweep(opts, dev, dtype, record: dict) -> list[Table]:
    """Decode roofline per model and batch size, GRPO rows and refresh cost (small preset); never raises."""
    ceil = Ceilings.measure()
    record["copy_gbps"] = ceil.copy_gbps
    print(f"copy bandwidth {ceil.copy_gbps:,.0f} GB/s (read + written)", flush=True)
    roof = Table(
        f"decode roofline (bytes a step must read / {ceil.copy_gbps:,.0f} GB/s copy bandwidth), "
        f"prompt {opts.prompt_len}, {opts.sweep_new_tokens} new tokens",
        [
            "model",
            "batch",
            "decode_moe",
            "compile",
            "decode tok/s",
            "ms/step",
            "roofline ms/step",
            "% roofline",
            "on/off",
            "compile s",
            "capture s",
            "experts/layer (uniform)",
            "MB/step",
        ],
    )
    grpo = Table(
        f"GRPO rollout, mean response ~{opts.grpo_mean_len} (max {opts.grpo_max_new}), "
        f"{opts.grpo_max_batch} engine rows",
        [
            "model",
            "prompts x G",
            "engine",
            "shared prefill",
            "decode_moe",
            "admit_min",
            "s",
            "ms/sample",
            "tok/s",
            "mean len",
            "steps",
            "prefills",
            "host s",
            "wait s",
        ],
    )
    record.update(roofline=[], grpo=[], roofline_errors=[])
    tables = [roof, grpo]
    entries = [n.split(":") for n in opts.sweep_presets.split(",") if n] or [["small"]]
    names = [e[0] for e in entries]
    grpo_model = "small" if "small" in names else names[-1]  # the pipeline's model
    for name, *own_batches in entries:
        model = build_model(sweep_args(name), dev, dtype)
        batches = own_batches or opts.sweep_batches.split(",")
        for B in map(int, filter(None, batches if opts.sweep_presets else [])):
            for path in opts.sweep_moe.split(","):
                roofline_rows(model, name, B, path, opts, ceil.copy_gbps, roof, record)
        if name == grpo_model and opts.grpo:
            tables += grpo_rows(model, name, opts, grpo, record)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return tables


def roofline_rows(model, name: str, B: int, path: str, opts, copy_gbps: float, roof: Table, record: dict):
    """One roofline row per --sweep-compile setting, same model, batch and MoE path; on/off: the ratio of
    decode tokens/s of the compiled step to the op-by-op step measured just before (never raises)."""
    off_tok_s = None
    for mode in opts.sweep_compile.split(","):
        try:
            r = roofline_row(
                model,
                B,
                opts.prompt_len,
                opts.sweep_new_tokens,
                path,
                copy_gbps,
                opts.repeats,
                sync,
                compile_decode=mode == "on",
                mla_kernel=opts.mla_kernel == "on",
            )
        except Exception as e:  # e.g. out of memory at one size: the other rows still print
            msg = f"{name} B{B} {path} compile {mode}: {error_report(e)}"
            record["roofline_errors"].append(msg[:600])
            print("[roofline] failed:", record["roofline_errors"][-1], flush=True)
            continue
        if mode == "off":
            off_tok_s = r["decode_tokens_per_s"]
        ratio = r["decode_tokens_per_s"] / off_tok_s if mode == "on" and off_tok_s else None
        r.update(model=name, compile_on_off=ratio)
        record["roofline"].append(r)
        roof.add(
            name,
            B,
            path,
            mode,
            r["decode_tokens_per_s"],
            r["decode_step_ms"],
            r["roofline_step_ms"],
            r["pct_roofline"],
            "-" if ratio is None else ratio,
            r["compile_s"],
            r["capture_s"],
            f"{r['distinct_experts_measured']:.1f} ({r['distinct_experts_uniform']:.1f})",
            r["bytes_per_step"]["total"] / 1e6,
        )
        print(
            f"[roofline] {name} B{B} {path} compile {mode}: {r['decode_tokens_per_s']:,.0f} tok/s, "
            f"{r['decode_step_ms']:.2f} ms/step, {r['pct_roofline']:.1f} % of roofline"
            + ("" if ratio is None else f", on/off {ratio:.2f}x")
            + f"; untimed first run {r['warmup_s']:.1f} s ({r['compiles']} compiles {r['compile_s']:.1f} s, "
            f"{r['graphs']} graphs captured {r['capture_s']:.1f} s), in the timed runs "
            f"{r['compiles_timed']} compiles, {r['graphs_captured_timed']} captures; "
            f"compiled: {r['decode_compiled']}",
            flush=True,
        )
        for key in ("compile_error", "compile_error_layers", "graph_error"):  # what ran uncompiled / eagerly
            if r.get(key):
                print(f"[roofline] {name} B{B} {path} compile {mode}: {key} {r[key]}", flush=True)


def grpo_rows(model, name, opts, grpo: Table, record: dict) -> list[Table]:
    """Per engine setting (today's engine first, then shared prefill, auto MoE, admission in groups) one
    engine runs every workload, smallest first: the first run warms it (graph captures), later ones reuse."""
    specs = [tuple(map(int, spec.split("x"))) for spec in filter(None, opts.grpo.split(","))]
    for config in filter(None, opts.grpo_configs.split(",")):
        share, path, admit, compiled, compact = GRPO_CONFIGS[config]
        for G in sorted({G for _, G in specs}):
            admit_g = G if admit is None else max(admit, 1)
            engine = None
            for P, _ in sorted(s for s in specs if s[1] == G):
                try:
                    engine = engine or grpo_engine(
                        model,
                        opts.prompt_len,
                        opts.grpo_max_new,
                        opts.grpo_max_batch,
                        share,
                        path,
                        admit_g,
                        compiled,
                        compact,
                    )
                    r = grpo_row(
                        model,
                        P,
                        G,
                        opts.prompt_len,
                        opts.grpo_mean_len,
                        opts.grpo_max_new,
                        opts.grpo_max_batch,
                        share,
                        path,
                        opts.repeats,
                        sync,
                        admit_g,
                        engine,
                    )
                except Exception as e:
                    msg = f"grpo {P}x{G} {config}: {error_report(e)}"
                    record["roofline_errors"].append(msg[:600])
                    print("[grpo] failed:", record["roofline_errors"][-1], flush=True)
                    continue
                r["model"], r["config"] = name, config
                base = [
                    g for g in record["grpo"] if (g["config"], g["prompts"], g["group"]) == ("admit", P, G)
                ]
                if compiled and base:  # same settings uncompiled, measured earlier in this run
                    r["ms_per_sample_compiled_over_admit"] = r["ms_per_sample"] / base[0]["ms_per_sample"]
                    print(
                        f"[grpo] {P}x{G} compiled / admit ms per sample: "
                        f"{r['ms_per_sample_compiled_over_admit']:.2f}",
                        flush=True,
                    )
                record["grpo"].append(r)
                grpo.add(
                    name,
                    f"{P}x{G}",
                    config,
                    share,
                    path,
                    admit_g,
                    r["seconds"],
                    r["ms_per_sample"],
                    r["tokens_per_s"],
                    r["mean_len"],
                    r["decode_steps"],
                    r["prefills"],
                    r["host_s"],
                    r["wait_s"],
                )
                print(
                    f"[grpo] {P}x{G} {config} (shared={share} {path} admit_min={admit_g}): "
                    f"{r['ms_per_sample']:.2f} ms/sample, {r['graphs_captured_timed']} graphs captured and "
                    f"{r['compiles_timed']} compiles in the timed runs, {r['rows_moved']:.0f} rows moved; "
                    f"untimed first run "
                    f"{r['warmup_s']:.1f} s, compile {r['compile_s']:.1f} s"
                    + f"; compiled: {r['decode_compiled']}"
                    + (f"; compile_error {r['compile_error']}" if r["compile_error"] else ""),
                    flush=True,
                )
            del engine
    refresh = Table(
        "weight refresh into a non-colocated engine (update_weights)", ["model", "ms", "GB", "GB/s"]
    )
    try:
        r = refresh_row(model, sync)
        record["refresh"] = {"model": name, **r}
        refresh.add(name, r["seconds"] * 1e3, r["bytes"] / 1e9, r["gbps"])
    except Exception as e:
        record["roofline_errors"].append(f"refresh: {type(e).__name__}: {e}"[:300])
    return [refresh]


def sort_expert_order(flat_P: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """decode.expert_order as the engine computed it before 116aaf4: a stable radix sort and scatter-added
    counts (the --expert-order sort baseline)."""
    counts_E = torch.zeros(n_experts, dtype=torch.int32, device=flat_P.device).scatter_add_(
        0, flat_P, torch.ones_like(flat_P, dtype=torch.int32)
    )
    return torch.sort(flat_P, stable=True).indices, counts_E.cumsum(0, dtype=torch.int32)


def main() -> None:
    opts = parse()
    if opts.expert_order == "sort":
        import r1core.rollout.decode as decode

        decode.expert_order = sort_expert_order
        print("[expert-order] decode's grouped MoE sorts the routed rows with torch.sort", flush=True)
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    margs = presets["tiny"] if opts.tiny else anchor_args()
    model = build_model(margs, dev, dtype)
    prompts = torch.randint(0, margs.vocab_size, (opts.batch, opts.prompt_len), device=dev)
    sp = SamplingParams(temperature=1.0, max_new_tokens=opts.new_tokens, seed=0)
    max_len = opts.prompt_len + opts.new_tokens
    results, record = (
        {},
        {
            "batch": opts.batch,
            "prompt_len": opts.prompt_len,
            "new_tokens": opts.new_tokens,
            "dtype": str(dtype),
            "params": sum(p.numel() for p in model.parameters()),
        },
    )
    variants = opts.variants.split(",")
    engine = BuiltinEngine(model, max_batch=opts.batch, max_len=max_len)
    record["kv_bytes_per_token_ours"] = engine.kv_cache_bytes_per_token()
    if "graphs" in variants:
        results["r1core graphs"] = run_ours("r1core graphs", engine, prompts.tolist(), sp, opts.repeats)
    if "grouped" in variants:
        grouped = BuiltinEngine(model, max_batch=opts.batch, max_len=max_len, decode_moe="grouped")
        results["r1core graphs+grouped MoE"] = run_ours(
            "r1core graphs+grouped MoE", grouped, prompts.tolist(), sp, opts.repeats
        )
        del grouped
    if "eager" in variants:
        eager = BuiltinEngine(model, max_batch=opts.batch, max_len=max_len, cuda_graphs=False)
        results["r1core eager"] = run_ours("r1core eager", eager, prompts.tolist(), sp, opts.repeats)
        del eager
    if "triton" in variants and dev.type == "cuda":
        try:
            model.set_moe_impl("triton")
            tri = BuiltinEngine(model, max_batch=opts.batch, max_len=max_len, decode_moe="model")
            results["r1core graphs+triton MoE"] = run_ours(
                "r1core graphs+triton MoE", tri, prompts.tolist(), sp, opts.repeats
            )
        except Exception as e:  # kernels missing or not capturable: report, keep going
            record["triton_variant_error"] = error_report(e)[:2000]
            print("[triton] failed:", record["triton_variant_error"], flush=True)
        finally:
            model.set_moe_impl("ref")
    if not opts.skip_hf:
        try:
            results["HF transformers"] = run_hf(model, dtype, dev, prompts, engine, opts, record)
        except Exception as e:  # keep our numbers even if this transformers version cannot load the export
            record["hf_error"] = error_report(e)[:2000]
            print("[HF] failed:", record["hf_error"], flush=True)
    del model, engine
    extra = roofline_sweep(opts, dev, dtype, record) if opts.sweep_presets or opts.grpo else []
    if opts.profile:
        extra += profile_rows(opts, dev, dtype, record)
    report(results, record, extra)


def profile_rows(opts, dev, dtype, record: dict) -> list[Table]:
    """--profile PRESET:B:MOE: where the time of one decode step goes (never raises; on the CPU its ops)."""
    name, B, path, *on = opts.profile.split(":")
    try:
        model = build_model(sweep_args(name), dev, dtype)
        r = profile_decode(
            model,
            int(B),
            opts.prompt_len,
            path,
            top=opts.profile_top,
            compile_decode=on == ["on"],
            mla_kernel=opts.mla_kernel == "on",
        )
        del model
    except Exception as e:  # the other figures stay
        record["profile_error"] = error_report(e)[:2000]
        print("[profile] failed:", record["profile_error"], flush=True)
        return []
    print(r.pop("table"), flush=True)
    record["profile"] = r
    t = Table(
        f"top kernels of one decode step: {name} B{B} S{r['S']} decode_moe={path} "
        f"compile_decode={r['compile_decode']}, {r['step_ms']:.3f} ms of kernels per step, "
        f"{r['launches']:.0f} launches per step",
        ["kernel", "ms/step", "% of step"],
    )
    for k in r["kernels"]:
        t.add(*k)
    return [t]


def report(results: dict, record: dict, extra: list[Table]) -> None:
    hf = results.get("HF transformers", {}).get("tokens_per_s")
    table = Table(
        f"rollout: batch {record['batch']}, prompt {record['prompt_len']}, {record['new_tokens']} new tokens",
        ["provider", "seconds", "tokens/s", "x HF", "peak GiB"],
    )
    for name, r in results.items():
        r["x_hf"] = r["tokens_per_s"] / hf if hf else None
        table.add(name, r["seconds"], r["tokens_per_s"], r["x_hf"] if r["x_hf"] else "-", r["peak_gib"])
    kv = Table("KV cache bytes per token", ["provider", "bytes/token"])
    kv.add("r1core (MLA latent)", record["kv_bytes_per_token_ours"])
    if "kv_bytes_per_token_hf" in record:
        kv.add("HF DynamicCache (measured)", record["kv_bytes_per_token_hf"])
    png = os.path.join(out_dir(), "bench_rollout.png")
    bar_plot(
        png,
        "rollout tokens/s",
        list(results),
        [r["tokens_per_s"] for r in results.values()],
        "generated tokens/s",
    )
    record.update(results=results, png=png)
    best = max((r["tokens_per_s"] for k, r in results.items() if k.startswith("r1core")), default=0.0)
    record["speedup_vs_hf"] = best / hf if hf else None
    finish("bench_rollout", [table, kv, *extra], record)


if __name__ == "__main__":
    main()
