"""Training-step throughput on one GPU: r1core (small preset, bf16) beside megatron-core's GPTModel.

    python benchmarks/bench_train.py                     # H100: every variant, B4 x T2048, ~200 s budget
    python benchmarks/bench_train.py --variants triton_cudnn,megatron --steps 3
    python benchmarks/bench_train.py --tiny              # CPU smoke run (tiny preset, fp32, no megatron)

One full optimizer step per iteration (forward + backward + AdamW + expert-bias update) through
r1core's LocalEngine with LMObjective (fused linear cross-entropy, MTP, balance loss). Variants:
  ref            reference MoE path (per-expert loop), SDPA's default backend
  triton         r1core.kernels MoE path (fused router, permute kernels, grouped GEMM)
  triton_cudnn   + cuDNN attention (supports MLA's qk 192 / v 128 head dims; flash does not)
  triton_padv    + flash attention with v zero-padded to the qk head dim (50% extra P·V work)
  compile        triton MoE + torch.compile of every block (cuDNN attention)
  compile_ac     + activation checkpointing of every block (memory)
  compile_master compile with fp32 master weights and AdamW state (what training at small learning rates
                 needs; every other r1core variant is pure bf16 like the megatron one, for equal footing)
  compile_nomtp  compile with the MTP module off (n_mtp_modules=0): the same work as the torchtitan row
  compile_cgtrees_nomtp  the same with inductor's CUDA graph trees around every compiled block (what
                 mode="reduce-overhead" turns on): how much of the step is host launch overhead
  compile_graph_nomtp  compile_nomtp with parallel.cuda_graph (the whole step, AdamW included, one CUDA
                 graph, captured after two ordinary steps; its rows warm up at least four steps);
                 compile_graph: with MTP; compile_graph_fp8_nomtp, compile_graph_fp8dense_nomtp: FP8 with it
  compile_graph_tadam_nomtp  compile_graph_nomtp with optim.implementation=triton (r1core's AdamW kernel,
                 one multi-tensor launch per parameter group; the norm's sum of squares likewise);
                 compile_graph_tadam1_nomtp: one AdamW launch per tensor and torch's _foreach_norm
  compile_graph_master_nomtp  compile_graph_nomtp with fp32 master weights (the engine's default);
                 _master_tadam_: with r1core's AdamW kernel (it reads the bf16 gradients and writes the bf16
                 weights itself); _master_bf16m_: and BF16 moments (optim.bf16_moments, DeepSeek-V3's recipe)
  compile_fp8    compile with model.precision=fp8 (DeepSeek-V3's FP8 GEMMs, r1core.kernels.fp8);
                 compile_fp8_nomtp: MTP off; eager_fp8: without compile; compile_fp8dense_nomtp:
                 model.precision=fp8_dense (routed experts stay on bf16 grouped_mm)
  torchtitan     torchtitan 0.2.2's own DeepSeekV3Model at the preset's shapes (MLA, SDPA attention,
                 grouped-mm experts, its per-block torch.compile through its apply_compile, plain
                 cross-entropy, no MTP),
                 parameters in bf16, the same fused AdamW and gradient clipping as ours (torchtitan's own
                 defaults too); torchtitan_eager without compile. The same-run anchor. Its MoE token
                 dispatch and combine stay eager, as torchtitan 0.2.2 leaves them (not our choice).
  torchtitan_block  the same model with every TransformerBlock compiled whole (torch.compile(block), MoE
                 dispatch and combine included): a stronger torchtitan than its own recipe, for comparison
  megatron       megatron-core 0.16.1 GPTModel, local spec (no Transformer Engine), standard attention with
                 kv_channels 160 (so QK^T + PV FLOPs equal MLA's 192 + 128), SequentialMLP experts at the
                 same MoE shapes, sigmoid group-limited routing with expert bias, torch AdamW
Model FLOPs per token: 6 × (active matmul parameters, the output head counted again for MTP) + causal
attention (3 × 2·H·(d_qk + d_v)·(T+1)/2 per layer). MFU divides by the matmul peak measured in this run.
A per-category breakdown of GPU time and the top kernels (profiler, one step) are printed for every profiled
row (by default every r1core and torchtitan row), so the rows can be compared kernel by kernel.
Every compiled row reports the graphs dynamo compiled, its graph breaks and the inductor-generated kernels
(triton_poi/red/per/tem_*) of the profiled step, and fails if there are none: a compile that silently fell
back to eager code cannot pass for a compiled anchor.
Writes bench_train.json / bench_train.png under $OUT; the last line printed is the JSON record.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import sys
import time
import traceback
import types
from typing import NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Ceilings, Table, bar_plot, finish, out_dir, sync  # noqa: E402

from r1core.model import parameter_breakdown, presets  # noqa: E402
from r1core.parallel import ParallelConfig  # noqa: E402
from r1core.parallel.optim import adamw  # noqa: E402
from r1core.train.engine import LocalEngine, OptimConfig  # noqa: E402
from r1core.train.objectives import LMObjective  # noqa: E402

# same-run providers every row is compared against, when they ran
ANCHORS = ("torchtitan", "torchtitan_block", "megatron")


class Variant(NamedTuple):
    moe: str
    attention: str
    compile: bool = False
    ac: bool = False  # activation checkpointing of every block
    master: bool = False  # fp32 master weights and AdamW state
    mtp: bool = True  # the preset's MTP module (off: n_mtp_modules=0)
    precision: str = "bf16"  # model.precision: bf16 | fp8
    cudagraphs: bool = False  # inductor's CUDA graph trees around each compiled block ("reduce-overhead")
    cuda_graph: bool = False  # parallel.cuda_graph: the whole optimizer step as one CUDA graph
    # optim.implementation: torch | triton | triton_bf16m (triton, optim.bf16_moments) | triton_per_tensor
    # (triton with one AdamW launch per tensor and torch's _foreach_norm, as before the multi-tensor launch)
    adamw: str = "torch"


VARIANTS = {
    "ref": Variant("ref", "auto"),
    "triton": Variant("triton", "auto"),
    "triton_cudnn": Variant("triton", "cudnn"),
    "triton_padv": Variant("triton", "flash_padv"),
    "compile": Variant("triton", "cudnn", True),
    "compile_ac": Variant("triton", "cudnn", True, ac=True),
    "compile_master": Variant("triton", "cudnn", True, master=True),
    "compile_nomtp": Variant("triton", "cudnn", True, mtp=False),
    "compile_cgtrees_nomtp": Variant("triton", "cudnn", True, mtp=False, cudagraphs=True),
    "compile_graph_nomtp": Variant("triton", "cudnn", True, mtp=False, cuda_graph=True),
    "compile_graph": Variant("triton", "cudnn", True, cuda_graph=True),
    # r1core's AdamW kernel (r1core.kernels.adamw); "master": the engine's default fp32 master weights
    "compile_graph_tadam_nomtp": Variant("triton", "cudnn", True, mtp=False, cuda_graph=True, adamw="triton"),
    "compile_graph_tadam1_nomtp": Variant(
        "triton", "cudnn", True, mtp=False, cuda_graph=True, adamw="triton_per_tensor"
    ),
    "compile_graph_master_nomtp": Variant("triton", "cudnn", True, mtp=False, cuda_graph=True, master=True),
    "compile_graph_master_tadam_nomtp": Variant(
        "triton", "cudnn", True, mtp=False, cuda_graph=True, master=True, adamw="triton"
    ),
    "compile_graph_master_bf16m_nomtp": Variant(
        "triton", "cudnn", True, mtp=False, cuda_graph=True, master=True, adamw="triton_bf16m"
    ),
    "compile_graph_fp8_nomtp": Variant("triton", "cudnn", True, mtp=False, precision="fp8", cuda_graph=True),
    "compile_graph_fp8dense_nomtp": Variant(
        "triton", "cudnn", True, mtp=False, precision="fp8_dense", cuda_graph=True
    ),
    "compile_fp8": Variant("triton", "cudnn", True, precision="fp8"),
    "compile_fp8_nomtp": Variant("triton", "cudnn", True, mtp=False, precision="fp8"),
    "compile_fp8dense_nomtp": Variant("triton", "cudnn", True, mtp=False, precision="fp8_dense"),
    "eager_fp8": Variant("triton", "cudnn", precision="fp8"),
}
CATEGORIES = [
    ("attention", r"fmha|flash|attention|cudnn|sdpa|softmax"),
    ("optimizer", r"adam|foreach|multi_tensor|sum_squares"),  # sum_squares: the gradient norm (ours)
    ("fp8 quantize", r"_fp8_quant|float8_copy"),
    ("moe", r"grouped|_gate_up|_rows_gemm|_wgrad|swiglu|permute|route|moe|_zero_"),
    # not a bare "lse": it matches the "false" of every templated aten kernel's name
    ("loss (fused CE)", r"_lse|lse_|_ce_|grpo|cross_entropy|nll_loss|_row_(stats|grad)|_tiled_"),
    ("gemm", r"gemm|cutlass|sm90|sm100|cublas|matmul|xmma|nvjet|wgmma"),
    ("other", r"."),
]
INDUCTOR_KERNEL = re.compile(r"^triton_(poi|red|per|tem|for)_")  # what inductor names its generated kernels


def flops_per_token(args, T: int) -> float:
    pc = parameter_breakdown(args)
    emb = args.vocab_size * args.dim
    per_expert = 3 * args.dim * args.moe_inter_dim
    mtp_active = (
        pc.mtp_unique - per_expert * (args.n_routed_experts - args.n_activated_experts) * args.n_mtp_modules
    )
    matmul = (pc.active - emb) + mtp_active + emb * args.n_mtp_modules
    attn_layers = args.n_layers + args.n_mtp_modules
    attention = 3 * 2 * args.n_heads * (args.qk_head_dim + args.v_head_dim) * (T + 1) / 2 * attn_layers
    return 6 * matmul + attention


def _sdpa_padded_v(sdpa):
    def wrapped(q, k, v, *a, **kw):
        dv = v.shape[-1]
        if dv < q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - dv))  # flash needs one head dim for q, k and v
        return sdpa(q, k, v, *a, **kw)[..., :dv]

    return wrapped


@contextlib.contextmanager
def attention_backend(kind: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if kind == "auto":
        yield
    elif kind == "cudnn":
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            yield
    else:
        original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _sdpa_padded_v(original)
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                yield
        finally:
            F.scaled_dot_product_attention = original


def _time_steps(step, warmup: int, steps: int) -> tuple[float, float, float]:
    """(median step ms, first-step s incl. compile, peak GiB over the timed steps)."""
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return sorted(times)[len(times) // 2], first, peak


def variant_args(args, v: Variant):
    changes = {"moe_impl": v.moe}
    if not v.mtp:
        changes["n_mtp_modules"] = 0
    if v.precision != "bf16":
        changes["precision"] = v.precision
    return args.replace(**changes)


def r1core_step(args, name: str, B: int, T: int, device, dtype):
    v = VARIANTS[name]
    attn = v.attention
    parallel = ParallelConfig(compile=v.compile, activation_checkpointing=v.ac, cuda_graph=v.cuda_graph)
    engine = LocalEngine(
        variant_args(args, v),
        parallel,
        OptimConfig(
            lr=1e-4,
            warmup_steps=0,
            master_weights=v.master,
            implementation=v.adamw.removesuffix("_bf16m").removesuffix("_per_tensor"),
            bf16_moments=v.adamw.endswith("_bf16m"),
        ),
        device,
        dtype,
        0,
    )
    if v.adamw == "triton_per_tensor":
        engine._triton_norm = False
        for opt in engine.optimizers:
            opt.multi_tensor = False
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab_size, (B, T + 1), generator=g).to(device)
    mb, objective = {"tokens": data[:, :-1], "labels": data[:, 1:]}, LMObjective()
    losses = []

    def step():
        graphs = contextlib.nullcontext()
        if v.cudagraphs:
            graphs = torch._inductor.config.patch({"triton.cudagraphs": True})
        with attention_backend(attn), graphs:
            if v.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            losses.append(engine.train_step([mb], objective)["loss"])

    return step, losses, engine


def megatron_step(args, B: int, T: int, device):
    """megatron-core GPTModel at the preset's shapes (local spec: no Transformer Engine)."""
    import megatron.core.transformer.moe.moe_utils as moe_utils
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    moe_utils.te_general_gemm = (
        None  # FACTS.md: the router raises NameError without Transformer Engine otherwise
    )
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "nccl", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1
        )
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    cfg = TransformerConfig(
        num_layers=args.n_layers,
        hidden_size=args.dim,
        num_attention_heads=args.n_heads,
        kv_channels=(args.qk_head_dim + args.v_head_dim) // 2,
        ffn_hidden_size=args.inter_dim,
        num_moe_experts=args.n_routed_experts,
        moe_router_topk=args.n_activated_experts,
        moe_ffn_hidden_size=args.moe_inter_dim,
        moe_shared_expert_intermediate_size=args.moe_inter_dim,
        moe_layer_freq=[0] * args.n_dense_layers + [1] * (args.n_layers - args.n_dense_layers),
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_num_groups=args.n_expert_groups,
        moe_router_group_topk=args.n_limited_groups,
        moe_router_topk_scaling_factor=args.route_scale,
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=args.seq_aux_alpha,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        bf16=True,
        params_dtype=torch.bfloat16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    spec = get_gpt_layer_local_spec(
        num_experts=args.n_routed_experts, moe_grouped_gemm=False, normalization="RMSNorm"
    )
    model = GPTModel(
        cfg, spec, vocab_size=args.vocab_size, max_sequence_length=T, position_embedding_type="rope"
    ).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, args.vocab_size, (B, T + 1), device=device)
    pos = torch.arange(T, device=device).expand(B, T)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=device), 1)[None, None]
    losses = []

    def step():
        loss = model(tokens[:, :-1], pos, mask, labels=tokens[:, 1:]).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    n_params = sum(p.numel() for p in model.parameters())
    per_expert = 3 * args.dim * args.moe_inter_dim
    active = (
        n_params
        - per_expert
        * (args.n_routed_experts - args.n_activated_experts)
        * (args.n_layers - args.n_dense_layers)
        - args.vocab_size * args.dim
    )
    attention = 3 * 2 * args.n_heads * (args.qk_head_dim + args.v_head_dim) * (T + 1) / 2 * args.n_layers
    return step, losses, model, 6 * active + attention


def _stand_in_for_unused_imports() -> None:
    """torchtitan 0.2.2 imports `torch.utils.tensorboard` (metrics) and HF `datasets` (its data loaders) when
    its package loads, though DeepSeekV3Model uses neither, and the GPU machines have neither: these
    sys.modules stand-ins let the import succeed; anything that really used them would fail loudly."""

    def absent(*_a, **_k):
        raise RuntimeError("a stand-in from bench_train.py: tensorboard / datasets are not installed here")

    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        sys.modules["torch.utils.tensorboard"] = types.SimpleNamespace(SummaryWriter=absent)
    try:
        import datasets  # noqa: F401
        import datasets.distributed  # noqa: F401
    except ImportError:
        sys.modules["datasets"] = types.SimpleNamespace(
            Dataset=object, load_dataset=absent, IterableDataset=object
        )
        sys.modules["datasets.distributed"] = types.SimpleNamespace(split_dataset_by_node=absent)


def torchtitan_args(args, T: int):
    """torchtitan 0.2.2's DeepSeekV3ModelArgs at the r1core preset's shapes (no MTP: 0.2.2 has none)."""
    _stand_in_for_unused_imports()
    from torchtitan.models.deepseek_v3 import DeepSeekV3ModelArgs
    from torchtitan.models.moe import MoEArgs

    targs = DeepSeekV3ModelArgs(
        vocab_size=args.vocab_size,
        dim=args.dim,
        inter_dim=args.inter_dim,
        moe_inter_dim=args.moe_inter_dim,
        n_layers=args.n_layers,
        n_dense_layers=args.n_dense_layers,
        n_heads=args.n_heads,
        q_lora_rank=args.q_lora_rank,
        kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.qk_nope_head_dim,
        qk_rope_head_dim=args.qk_rope_head_dim,
        v_head_dim=args.v_head_dim,
        rope_factor=args.rope_factor,
        moe_args=MoEArgs(
            num_experts=args.n_routed_experts,
            num_shared_experts=args.n_shared_experts,
            score_func=args.score_func.value,
            route_norm=args.norm_topk_prob,
            top_k=args.n_activated_experts,
            num_expert_groups=args.n_expert_groups,
            num_limited_groups=args.n_limited_groups,
            use_grouped_mm=torch.cuda.is_available(),
        ),
    )
    targs.moe_impl = "standard"  # what its trainer's update_from_config sets (expert_parallel_comm_backend)
    return targs


_TT_GROUPED_MM = None  # torchtitan's own (uncompiled) grouped-mm expert function, kept at first use


def torchtitan_step(args, B: int, T: int, device, dtype, compile_: str):
    """torchtitan's own model, built and compiled the way its trainer does on one GPU, in our AdamW loop."""
    global _TT_GROUPED_MM
    _stand_in_for_unused_imports()
    from torchtitan.models.deepseek_v3 import DeepSeekV3Model
    from torchtitan.models.llama4.infra.parallelize import apply_compile
    from torchtitan.models.moe import moe as tt_moe

    # apply_compile swaps in a compiled module-level expert function; every row starts from the original
    _TT_GROUPED_MM = _TT_GROUPED_MM or tt_moe._run_experts_grouped_mm
    tt_moe._run_experts_grouped_mm = _TT_GROUPED_MM

    with torch.device(device):
        model = DeepSeekV3Model(torchtitan_args(args, T))
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    for p in model.parameters():  # bf16 parameters like the r1core rows; freqs_cis stays complex
        p.data = p.data.to(dtype)
    if compile_ == "apply_compile":
        apply_compile(model, types.SimpleNamespace(backend="inductor"), False)
    elif compile_ == "block":  # whole blocks, MoE dispatch and combine included (not torchtitan's recipe)
        torch._dynamo.config.capture_scalar_outputs = True
        for layer_id, block in list(model.layers.named_children()):
            model.layers.register_module(layer_id, torch.compile(block))
    # The r1core rows' AdamW (fused, the same betas / eps / weight-decay groups), which is also torchtitan's
    # own default (optimizer.implementation = "fused"); plain torch.optim.AdamW is the slower foreach one.
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = adamw(named, OptimConfig(lr=1e-4, warmup_steps=0))
    params = [p for _, p in named]
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab_size, (B, T + 1), generator=g).to(device)
    losses = []

    def step():
        logits = model(data[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), data[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)  # as our engine and torchtitan's trainer
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    return step, losses, model


SYNC_CALLS = re.compile(r"Synchronize|cudaMemcpy(Async)?$|_local_scalar_dense")  # where the host waits


def device_timeline(kernels, host, top: int = 6) -> dict:
    """Where the GPU waits in one profiled step. `kernels` and `host` are (start_ns, end_ns, name) of the
    device kernels and of the host events (aten ops, CUDA runtime calls, annotations) on one clock.

    window: first kernel start to last kernel end; busy: the union of the kernels' intervals; idle: the
    rest. The `top` longest gaps between kernels come with the kernels on either side and the innermost host
    events running at the gap's middle (what the host was doing while the GPU waited); `host_waits` sums
    the host calls that block on the device (synchronize, a device-to-host copy, .item())."""
    ks = sorted(kernels)
    if not ks:
        return {"window_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "gaps": [], "host_waits": {}}
    busy, gaps = 0, []
    cur_s, cur_e, cur_name = ks[0]
    for s, e, name in ks[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append((s - cur_e, cur_e, cur_name, name))
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e = e
        if e >= cur_e:
            cur_name = name
    busy += cur_e - cur_s
    window = cur_e - ks[0][0]

    def host_at(t):
        inner = sorted((e - s, n) for s, e, n in host if s <= t <= e and not n.startswith("ProfilerStep"))
        return " < ".join(n[:40] for _, n in inner[:3])

    out_gaps = [
        {"ms": g / 1e6, "after": a[:60], "before": b[:60], "host": host_at(t0 + g // 2)}
        for g, t0, a, b in sorted(gaps, reverse=True)[:top]
    ]
    waits: dict[str, list] = {}
    for s, e, n in host:
        if SYNC_CALLS.search(n):
            w = waits.setdefault(n, [0, 0.0])
            w[0] += 1
            w[1] += (e - s) / 1e6
    return {
        "window_ms": window / 1e6,
        "busy_ms": busy / 1e6,
        "idle_ms": (window - busy) / 1e6,
        "gaps": out_gaps,
        "host_waits": {
            n: {"calls": c, "ms": ms} for n, (c, ms) in sorted(waits.items(), key=lambda kv: -kv[1][1])
        },
    }


def _timeline_of(prof) -> dict:
    kernels, host = [], []
    for ev in prof.profiler.kineto_results.events():
        span = (ev.start_ns(), ev.start_ns() + ev.duration_ns(), ev.name())
        (kernels if ev.device_type() == torch.autograd.DeviceType.CUDA else host).append(span)
    return device_timeline(kernels, host)


def breakdown(step, top: int = 15) -> tuple[dict[str, float], list[tuple[str, float, int]], dict, dict]:
    """GPU ms per category for one step, the `top` kernels by self device time (name, ms, calls), the
    inductor-generated kernels among all of them (distinct kernels, calls, ms): a compiled row has some; and
    the device timeline of a second profiled step with host events (`device_timeline`; host profiling adds
    overhead of its own, so its idle is an upper bound)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof_host:
        step()
        sync()
    timeline = _timeline_of(prof_host)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync()
    timeline["idle_ms_device_only"] = _timeline_of(prof)["idle_ms"]
    out = {name: 0.0 for name, _ in CATEGORIES}
    kernels = []
    inductor = {"kernels": 0, "calls": 0, "ms": 0.0}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if us <= 0:
            continue
        name = next(n for n, pat in CATEGORIES if re.search(pat, e.key, re.IGNORECASE))
        out[name] += us / 1e3
        kernels.append((e.key[:90], us / 1e3, e.count))
        if INDUCTOR_KERNEL.match(e.key):
            inductor["kernels"] += 1
            inductor["calls"] += e.count
            inductor["ms"] += us / 1e3
    return out, sorted(kernels, key=lambda k: -k[1])[:top], inductor, timeline


def is_compiled(name: str) -> bool:
    return name in ("torchtitan", "torchtitan_block") or (name in VARIANTS and VARIANTS[name].compile)


def dynamo_stats() -> dict:
    """Graphs dynamo compiled and graph breaks it took since the row began (counters cleared per row)."""
    c = torch._dynamo.utils.counters
    return {
        "graphs": int(c["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(c["graph_break"].values())),
        "break_reasons": sorted(c["graph_break"], key=lambda r: -c["graph_break"][r])[:3],
    }


def check_compiled(row: dict) -> None:
    """A compiled row that ran no inductor kernel (or compiled no graph) timed eager code: fail it loudly."""
    ind = row.get("inductor_kernels")
    if row["dynamo"]["graphs"] == 0 or (ind is not None and ind["kernels"] == 0):
        raise RuntimeError(
            f"{row['variant']} is meant to be compiled but ran eager code: dynamo graphs "
            f"{row['dynamo']['graphs']}, inductor kernels in the profiled step {ind}"
        )


def measure(name, args, a, device, dtype, peak_tflops) -> dict:
    row = {"variant": name}
    dynamo_scalars = torch._dynamo.config.capture_scalar_outputs
    torch._dynamo.utils.counters.clear()
    try:
        if name == "megatron":
            step, losses, keep, fpt = megatron_step(args, a.batch, a.seq, device)
        elif name.startswith("torchtitan"):
            how = {"torchtitan": "apply_compile", "torchtitan_block": "block"}.get(name, "")
            step, losses, keep = torchtitan_step(args, a.batch, a.seq, device, dtype, how)
            fpt = flops_per_token(args.replace(n_mtp_modules=0), a.seq)
        else:
            step, losses, keep = r1core_step(args, name, a.batch, a.seq, device, dtype)
            fpt = flops_per_token(variant_args(args, VARIANTS[name]), a.seq)
        graphed = name in VARIANTS and VARIANTS[name].cuda_graph
        ms, first, peak = _time_steps(step, max(a.warmup, 4) if graphed else a.warmup, a.steps)
        tok_s = a.batch * a.seq / (ms / 1e3)
        row.update(
            ms=ms,
            first_step_s=first,
            tokens_s=tok_s,
            peak_gib=peak,
            loss=losses[-1],
            model_tflops=fpt * tok_s / 1e12,
            mfu=fpt * tok_s / (peak_tflops * 1e12),
            gflops_per_token=fpt / 1e9,
            dynamo=dynamo_stats(),
        )
        profiled = name in a.breakdown.split(",") or (a.breakdown == "auto" and name != "megatron")
        if profiled and torch.cuda.is_available():
            prof = breakdown(step)
            row["breakdown_ms"], row["top_kernels"], row["inductor_kernels"], row["timeline"] = prof
        blind = graphed and not sum(row.get("breakdown_ms", {}).values())
        if blind:  # a profiler that does not trace kernels inside graph replays: the timing still stands
            row["profile_note"] = "the profiler saw no kernels inside the CUDA graph's replay"
        if is_compiled(name) and not blind:
            check_compiled(row)
    except Exception as e:  # report and go on: one failing provider must not hide the others
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc()
    keep = step = None  # noqa: F841  (drops this row's model before the next row is built)
    torch._dynamo.reset()  # each row compiles afresh (no recompile limits or guards carried between rows)
    torch._dynamo.config.capture_scalar_outputs = dynamo_scalars  # torchtitan's apply_compile sets it
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def summary_table(rows: list[dict], title: str) -> Table:
    """One line per row, with its tokens/s as a ratio of each same-run anchor that ran."""
    anchors = {r["variant"]: r["tokens_s"] for r in rows if r["variant"] in ANCHORS and "error" not in r}
    table = Table(
        title,
        ["variant", "ms/step", "tokens/s"]
        + [f"× {n} tok/s" for n in anchors]
        + [
            "model TFLOP/s",
            "MFU %",
            "peak GiB",
            "first step s",
            "loss",
            "graphs / breaks",
            "inductor kernels / ms",
        ],
    )
    for r in rows:
        if "error" in r:
            table.add(r["variant"], "failed: " + r["error"][:120], *[""] * (len(anchors) + 8))
            continue
        ratios = [r["tokens_s"] / t for t in anchors.values()]
        for name, t in anchors.items():
            r[f"x_{name}"] = r["tokens_s"] / t
        dyn, ind = r.get("dynamo", {}), r.get("inductor_kernels")
        table.add(
            r["variant"],
            r["ms"],
            r["tokens_s"],
            *ratios,
            r["model_tflops"],
            100 * r["mfu"],
            r["peak_gib"],
            r["first_step_s"],
            r["loss"],
            f"{dyn.get('graphs', '')} / {dyn.get('graph_breaks', '')}",
            f"{ind['kernels']} / {ind['ms']:.1f}" if ind else "",
        )
    return table


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--variants", default="triton_cudnn,compile,megatron,ref,triton,triton_padv,compile_ac,compile_master"
    )
    p.add_argument(
        "--budget-s", type=float, default=200.0, help="skip the remaining variants after this long"
    )
    p.add_argument("--preset", default="small")
    p.add_argument("--layers", type=int, default=0, help="override n_layers (0: the preset's)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--breakdown",
        default="auto",
        help="variants to profile, comma-separated ('auto': every r1core and torchtitan variant)",
    )
    p.add_argument("--tiny", action="store_true", help="CPU smoke run")
    a = p.parse_args(argv)
    if a.tiny:
        a.preset, a.batch, a.seq, a.steps, a.warmup, a.variants = "tiny", 2, 32, 2, 1, "ref"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = presets[a.preset]
    if a.layers:
        args = args.replace(n_layers=a.layers)
    ceil, t0, rows = Ceilings.measure(), time.perf_counter(), []
    for v in a.variants.split(","):
        if time.perf_counter() - t0 > a.budget_s:
            rows.append({"variant": v, "error": f"skipped: the {a.budget_s:.0f} s budget was spent"})
            continue
        rows.append(measure(v, args, a, device, dtype, ceil.matmul_tflops))
        with open(os.path.join(out_dir(), "bench_train.partial.json"), "w") as f:  # survives a killed run
            json.dump(rows, f, indent=1)
    tables = [summary_table(rows, f"train step, {a.preset} preset, B{a.batch} x T{a.seq}, {dtype}")]
    for r in rows:
        if "breakdown_ms" in r:
            bt = Table(
                f"GPU time by category, {r['variant']} (one profiled step)", ["category", "ms", "% of step"]
            )
            total = sum(r["breakdown_ms"].values()) or 1.0
            for cat, ms in r["breakdown_ms"].items():
                bt.add(cat, ms, 100 * ms / total)
            tables.append(bt)
            kt = Table(
                f"top kernels, {r['variant']} (one profiled step)", ["kernel", "ms", "calls", "% of step"]
            )
            for k, ms, n in r["top_kernels"]:
                kt.add(k, ms, n, 100 * ms / total)
            tables.append(kt)
            tl = r["timeline"]
            waits = ", ".join(f"{n} {w['calls']}x {w['ms']:.1f} ms" for n, w in tl["host_waits"].items())
            gt = Table(
                f"device idle, {r['variant']}: window {tl['window_ms']:.1f} ms, busy {tl['busy_ms']:.1f}, "
                f"idle {tl['idle_ms']:.1f} (device-only profile: {tl['idle_ms_device_only']:.1f}); "
                f"host waits {waits or 'none'}",
                ["gap ms", "after kernel", "before kernel", "host at the gap"],
            )
            for g in tl["gaps"]:
                gt.add(g["ms"], g["after"], g["before"], g["host"])
            tables.append(gt)
    ok = [r for r in rows if "error" not in r]
    if ok:
        bar_plot(
            os.path.join(out_dir(), "bench_train.png"),
            f"training tokens/s, {a.preset} B{a.batch}xT{a.seq}",
            [r["variant"] for r in ok],
            [r["tokens_s"] for r in ok],
            "tokens/s",
        )
    record = {
        "preset": a.preset,
        "batch": a.batch,
        "seq": a.seq,
        "matmul_peak_tflops": ceil.matmul_tflops,
        "rows": rows,
    }
    finish("bench_train", tables, record)
    return record


if __name__ == "__main__":
    main()
