"""Plan a training layout: memory per GPU and a step-time estimate for tp × pp × ep × dp and a schedule.

Arithmetic on `ModelArgs` and `ParallelConfig` only (no model is built, no GPU or process group is
needed): `r1core plan` enumerates layouts, keeps those that fit in GPU memory and ranks them by
estimated step time.

Parameters come from the model's own arguments (`param_counts`, checked in the tests against the
module built on the meta device and against DeepSeek-V3's published 671B / 37B / 14B MTP).

Memory per GPU, for the pipeline rank that holds the most:
- weights, gradients, fp32 master weights and gradients (r1core's `MasterWeights`, not sharded) and
  AdamW's two moments, sharded over the data-parallel ranks with ZeRO-1 (Rajbhandari et al. 2020,
  "ZeRO", stage 1): dense parameters over dp, routed experts over dp / ep (their replicas).
- activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models", eq. 1-2 and Table 2) count the tensors each layer saves for backward, per token; we count
  them for MLA + MoE the same way (`layer_activation_elems`), with flash attention (no s × s
  scores) and no dropout, as megatron-core's `theoretical_memory_usage.py` does for SwiGLU models.
  Tensor parallelism divides the head- and expert-sharded tensors by tp, sequence parallelism the
  rest. Full activation checkpointing keeps only each layer's input plus one layer being recomputed.
  In-flight micro-batches on the first pipeline rank: pp for 1F1B (Narayanan et al. 2021),
  pp × (1 + (pp - 1) / (pp · v)) for interleaved 1F1B with v stages per rank (Korthikanti §4.2.3),
  pp + 1 for DualPipeV (DeepSeek-V3 Table 2; the DualPipe repository's DualPipeV row), each in units
  of one micro-batch through the rank's layers.

Step time = compute + pipeline bubble + exposed communication:
- compute: 6 · active matmul parameters + causal attention per token (the same count as
  benchmarks/bench_train.py's MFU), times 4/3 with full recomputation, at `mfu` of the peak.
- bubble (F, B = full backward, W = its weight part, per micro-batch; F : B : W = 1 : 2 : 1):
  1F1B (pp - 1)(F + B); interleaved (pp - 1)(F + B) / v; DualPipeV (pp/2 - 1)(F&B + B - 3W) with
  F&B = F + B over a chunk (half a rank's layers) (DeepSeek-V3 Table 2).
- communication per GPU (ring volumes): TP 2(t-1)/t · s·b·h per all-reduce, 4 per layer and
  micro-batch (6 with recomputation; Korthikanti §3); EP 4 all-to-alls per MoE layer of
  s·b·k·h (ep-1)/ep; PP one s·b·h activation forward and one gradient back per stage boundary and
  micro-batch; DP reduce-scatter + all-gather (ZeRO-1) or all-reduce of the gradients,
  2(d-1)/d · bytes. A group inside a node (`node_size` ranks, megatron order tp-ep-dp-pp) uses NVLink,
  else InfiniBand. TP is never hidden; `overlap` is the share of EP, PP and DP traffic hidden behind
  compute (DualPipe hides nearly all of it; r1core today hides none).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from r1core.model.args import ModelArgs

from .config import ParallelConfig, PPSchedule, check_layout

GIB = 1024**3


@dataclass(frozen=True)
class ParamCounts:
    embed: int
    head: int
    attn: int  # one MLA layer, its norms included
    dense_mlp: int  # one dense MLP
    moe_shared: int  # one MoE layer without its routed experts: gate and shared experts
    expert: int  # one routed expert
    mtp_unique: int  # MTP modules without the embedding and head they share
    total: int  # main model (the paper's 671B)
    active: int  # per token (37B)
    mtp: int  # MTP as the released checkpoint stores it, with its embedding and head copies (14B)


def param_counts(a: ModelArgs) -> ParamCounts:
    D, H = a.dim, a.n_heads
    if a.q_lora_rank:
        q = D * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * H * a.qk_head_dim
    else:
        q = D * H * a.qk_head_dim
    kv = (
        D * (a.kv_lora_rank + a.qk_rope_head_dim)
        + a.kv_lora_rank
        + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim)
    )
    attn = q + kv + H * a.v_head_dim * D + 2 * D  # + attn_norm, ffn_norm
    expert = 3 * D * a.moe_inter_dim
    moe_shared = a.n_routed_experts * D + 3 * D * a.n_shared_experts * a.moe_inter_dim
    moe = moe_shared + a.n_routed_experts * expert
    dense_mlp = 3 * D * a.inter_dim
    embed = a.vocab_size * D
    head = 0 if a.tie_embeddings else embed
    total = embed + head + D + a.n_layers * attn + a.n_dense_layers * dense_mlp + a.n_moe_layers * moe
    active = total - a.n_moe_layers * (a.n_routed_experts - a.n_activated_experts) * expert
    mtp_unique = a.n_mtp_modules * (2 * D + 2 * D * D + attn + moe + D)  # enorm, hnorm, eh_proj, block, norm
    return ParamCounts(
        embed=embed,
        head=head,
        attn=attn,
        dense_mlp=dense_mlp,
        moe_shared=moe_shared,
        expert=expert,
        mtp_unique=mtp_unique,
        total=total,
        active=active,
        mtp=mtp_unique + a.n_mtp_modules * (embed + embed),
    )


def flops_per_token(a: ModelArgs, seq: int) -> float:
    """Training FLOPs per token: 6 × active matmul parameters (MTP included) + causal attention."""
    c = param_counts(a)
    mtp_active = c.mtp_unique - a.n_mtp_modules * (a.n_routed_experts - a.n_activated_experts) * c.expert
    matmul = (c.active - c.embed) + mtp_active + c.embed * a.n_mtp_modules
    attn_layers = a.n_layers + a.n_mtp_modules
    attention = 3 * 2 * a.n_heads * (a.qk_head_dim + a.v_head_dim) * (seq + 1) / 2 * attn_layers
    return 6 * matmul + attention


def layer_activation_elems(a: ModelArgs, dense: bool, tp: int = 1, sp: bool = False) -> float:
    """Elements one layer saves for backward, per token (Korthikanti et al. 2022's count, MLA + MoE).

    Model-dim tensors (norm inputs, the residual) are split over tp only with sequence parallelism;
    head-sharded tensors and expert hidden states always are.
    """
    D, H = a.dim, a.n_heads
    rep = 1 / tp if sp else 1.0
    mla = (
        2 * D * rep  # attn_norm input, its output (wq_a / wkv_a input)
        + (2 * a.q_lora_rank if a.q_lora_rank else 0)  # q_norm input and output (wq_b input)
        + 2 * a.kv_lora_rank  # kv_norm input and output (wkv_b input)
        + (2 * H * a.qk_head_dim + 2 * H * a.v_head_dim) / tp
    )  # q, k, v, attention output (wo input)
    if dense:
        ffn = 2 * D * rep + 3 * a.inter_dim / tp  # ffn_norm in/out; w1, w3 outputs and w2 input
    else:
        k = a.n_activated_experts
        ffn = (
            2 * D * rep  # ffn_norm in/out (gate and dispatch input)
            + a.n_routed_experts * 2 * rep  # router scores (fp32)
            + 2 * k * D  # permuted rows in, expert rows out (combine)
            + 3 * k * a.moe_inter_dim / tp  # routed SwiGLU: w1, w3 outputs, w2 input
            + 3 * a.n_shared_experts * a.moe_inter_dim / tp
        )
    return mla + ffn


@dataclass(kw_only=True)
class Hardware:
    """Defaults: the DeepSeek-V3 cluster (H800, §3.1-3.2: IB 50 GB/s, NVLink ~160 GB/s achieved per GPU)."""

    gpus: int = 8
    node_size: int = 8  # GPUs per node (NVLink domain)
    gpu_mem_gib: float = 80.0
    reserve_gib: float = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
    peak_tflops: float = 989.0  # dense bf16 (H100 / H800 SXM)
    mfu: float = 0.40  # share of the peak the matmuls reach while computing
    nvlink_gbps: float = 160.0
    ib_gbps: float = 50.0
    overlap: float = 0.0  # share of EP, PP and DP traffic hidden behind compute

    def __post_init__(self) -> None:
        _check(
            self,
            unit=("mfu", "overlap"),
            positive=("gpus", "node_size", "gpu_mem_gib", "peak_tflops", "mfu", "nvlink_gbps", "ib_gbps"),
        )


@dataclass(kw_only=True)
class Workload:
    seq_len: int = 4096
    global_batch: int = 1024  # sequences per optimizer step
    micro_batch: int = 1  # sequences per micro-batch on one rank
    weight_bytes: int = 2  # bf16 weights and activations
    grad_bytes: int = 2
    master_weights: bool = True  # fp32 master weights and gradients (+8 B/param) and fp32 AdamW moments
    shard_master: bool = False  # ZeRO-1 shards the masters too (megatron's distributed optimizer, DeepSeek)
    moment_bytes: int = 4  # per AdamW moment with master weights (DeepSeek-V3 keeps them in BF16: 2)
    dispatch_bytes: int = 2  # EP all-to-all element size (DeepSeek-V3 dispatches in FP8: 1)

    def __post_init__(self) -> None:
        _check(
            self,
            positive=(
                "seq_len",
                "global_batch",
                "micro_batch",
                "weight_bytes",
                "grad_bytes",
                "moment_bytes",
                "dispatch_bytes",
            ),
        )


def _check(obj, positive=(), unit=()) -> None:
    bad = [f"{k}={getattr(obj, k)} (must be > 0)" for k in positive if not getattr(obj, k) > 0]
    bad += [f"{k}={getattr(obj, k)} (must be in [0, 1])" for k in unit if not 0 <= getattr(obj, k) <= 1]
    if bad:
        raise ValueError(f"r1core plan: {', '.join(bad)}")


@dataclass
class Estimate:
    layout: ParallelConfig
    microbatches: int
    runnable: str  # "" when r1core's layout check accepts it, else why not
    mem: dict = field(default_factory=dict)  # GiB on the fullest rank, by kind
    time: dict = field(default_factory=dict)  # seconds per step, by kind
    comm_gb: dict = field(default_factory=dict)  # GB sent per GPU per step, by group
    mfu: float = 0.0  # model FLOPs / (step time × GPUs × peak)
    fits: bool = False

    @property
    def mem_total(self) -> float:
        return sum(self.mem.values())

    @property
    def step_s(self) -> float:
        return sum(self.time.values())

    def row(self) -> dict:
        c = self.layout
        return {
            "tp": c.tp,
            "pp": c.pp,
            "ep": c.ep,
            "dp": c.dp,
            "schedule": c.pp_schedule.value if c.pp > 1 else "-",
            "ac": c.activation_checkpointing,
            "sp": c.sequence_parallel,
            "microbatches": self.microbatches,
            "mem_gib": round(self.mem_total, 2),
            **{f"mem_{k}": round(v, 2) for k, v in self.mem.items()},
            "step_s": round(self.step_s, 4),
            **{f"t_{k}": round(v, 4) for k, v in self.time.items()},
            **{f"gb_{k}": round(v, 3) for k, v in self.comm_gb.items()},
            "mfu": round(self.mfu, 4),
            "fits": self.fits,
            "runnable": self.runnable or "yes",
        }


def stage_layer_ranges(n_layers: int, n_stages: int) -> list[range]:
    """Consecutive layers per stage; an uneven split gives the later stages one layer more."""
    bounds = [s * n_layers // n_stages for s in range(n_stages + 1)]
    return [range(bounds[s], bounds[s + 1]) for s in range(n_stages)]


def rank_stage_ids(rank: int, cfg: ParallelConfig) -> list[int]:
    """Stages pipeline rank `rank` holds (r1core.parallel.pipeline.rank_stages)."""
    if cfg.pp == 1 or cfg.pp_schedule == PPSchedule.one_f_one_b:
        return [rank]
    if cfg.pp_schedule == PPSchedule.interleaved:
        return [rank + k * cfg.pp for k in range(cfg.pp_virtual)]
    return [rank, 2 * cfg.pp - 1 - rank]


def in_flight(cfg: ParallelConfig, m: int, rank: int = 0) -> float:
    """Micro-batches whose activations pipeline rank `rank` holds at its peak (module docstring).

    1F1B: rank r holds pp - r. Interleaved and DualPipeV: the first rank's count for every rank (the
    V shape gives every rank a first and a last stage; interleaving nearly levels the ranks).
    """
    p = cfg.pp
    if p == 1:
        return 1.0
    if cfg.pp_schedule == PPSchedule.one_f_one_b:
        return float(min(p - rank, m))
    if cfg.pp_schedule == PPSchedule.interleaved:
        return min(p * (1 + (p - 1) / (p * cfg.pp_virtual)), float(m))
    return float(min(p + 1, m))


def bubble_units(cfg: ParallelConfig) -> float:
    """Pipeline bubble in units of one micro-batch's forward through a rank's layers (F = 1, B = 2, W = 1)."""
    p = cfg.pp
    if p == 1:
        return 0.0
    if cfg.pp_schedule == PPSchedule.one_f_one_b:
        return (p - 1) * 3.0
    if cfg.pp_schedule == PPSchedule.interleaved:
        return (p - 1) * 3.0 / cfg.pp_virtual
    f, b, w = 0.5, 1.0, 0.5  # a chunk is half a rank's layers
    return max(p / 2 - 1, 0) * ((f + b) + b - 3 * w)


def _rank_params(a: ModelArgs, c: ParamCounts, cfg: ParallelConfig, rank: int):
    """(dense, expert) parameters held by pipeline rank `rank`, and its dense and MoE layer counts."""
    tp, ep = cfg.tp, cfg.ep
    ranges = stage_layer_ranges(a.n_layers, cfg.n_stages)
    stages = rank_stage_ids(rank, cfg)
    layers = [i for s in stages for i in ranges[s]]
    n_dense = sum(i < a.n_dense_layers for i in layers)
    n_moe = len(layers) - n_dense
    dense = len(layers) * c.attn / tp + n_dense * c.dense_mlp / tp + n_moe * c.moe_shared / tp
    expert = n_moe * a.n_routed_experts / ep * c.expert / tp
    last = cfg.n_stages - 1 in stages
    if 0 in stages or (last and a.n_mtp_modules):
        dense += c.embed / tp
    if last:
        mtp_experts = a.n_mtp_modules * a.n_routed_experts * c.expert
        dense += c.head / tp + a.dim + (c.mtp_unique - mtp_experts) / tp
        expert += mtp_experts / ep / tp
        n_moe += a.n_mtp_modules
    return dense, expert, n_dense, n_moe


def _bandwidth(hw: Hardware, span: int) -> float:
    """GB/s of a group whose ranks lie `span` consecutive ranks apart at most (inside a node: NVLink)."""
    return hw.nvlink_gbps if span <= hw.node_size else hw.ib_gbps


def estimate(a: ModelArgs, cfg: ParallelConfig, hw: Hardware, wl: Workload) -> Estimate:
    """Memory and step time of one layout (`cfg.dp` resolved); see the module docstring for the formulas."""
    tp, pp, ep, dp = cfg.tp, cfg.pp, cfg.ep, cfg.dp
    m = max(wl.global_batch // (dp * wl.micro_batch), 1)
    try:
        check_layout(a, dataclasses.replace(cfg, microbatches=m), hw.gpus)
        runnable = ""
    except ValueError as e:
        runnable = str(e).split(": ", 1)[-1]
    c = param_counts(a)
    wb, tokens = wl.weight_bytes, wl.seq_len * wl.micro_batch
    sp, ac = cfg.sequence_parallel, cfg.activation_checkpointing
    best = None
    for rank in range(pp):
        dense, expert, n_dense, n_moe = _rank_params(a, c, cfg, rank)
        params = dense + expert
        opt_bytes = 2 * wl.moment_bytes if wl.master_weights else 2 * wb
        shard = (dense / dp + expert / max(dp // ep, 1)) if cfg.zero1 else params
        master = (shard if wl.shard_master else params) * 8 if wl.master_weights else 0.0
        mem = {
            "weights": params * wb,
            "grads": params * wl.grad_bytes,
            "master": master,
            "optimizer": shard * opt_bytes,
        }
        per_layer = [layer_activation_elems(a, True, tp, sp)] * n_dense + [
            layer_activation_elems(a, False, tp, sp)
        ] * n_moe
        if ac:
            act = (len(per_layer) * a.dim / (tp if sp else 1) + max(per_layer, default=0)) * tokens * wb
        else:
            act = sum(per_layer) * tokens * wb
        mem["activations"] = act * in_flight(cfg, m, rank)
        if cfg.n_stages - 1 in rank_stage_ids(rank, cfg):  # fused loss: one logits chunk, the head's gradient
            mem["loss"] = min(768 * 2**20, tokens * a.vocab_size / tp * wb) + c.head / tp * wb
        mem = {k: v / GIB for k, v in mem.items()}
        if best is None or sum(mem.values()) > sum(best[0].values()):
            best = (mem, n_dense + n_moe, n_moe, params, dense, expert)
    mem, n_layers_rank, n_moe_rank, params, dense, expert = best
    mem["reserve"] = hw.reserve_gib

    flops = flops_per_token(a, wl.seq_len) * wl.seq_len * wl.global_batch
    compute = flops * (4 / 3 if ac else 1) / (hw.gpus * hw.peak_tflops * 1e12 * hw.mfu)
    fwd_mb = compute / m / (4 if ac else 3)  # one micro-batch's forward through the rank's layers
    act_bytes = tokens * a.dim * wb
    gb = {}
    gb["tp"] = n_layers_rank * m * (6 if ac else 4) * 2 * (tp - 1) / tp * act_bytes / 1e9
    gb["ep"] = (
        n_moe_rank
        * m
        * (6 if ac else 4)
        * (ep - 1)
        / ep
        * tokens
        / (tp if sp else 1)
        * a.n_activated_experts
        * a.dim
        * wl.dispatch_bytes
        / 1e9
    )
    gb["pp"] = (2 * m * cfg.stages_per_rank * act_bytes / (tp if sp else 1) / 1e9) if pp > 1 else 0.0
    edp = max(dp // ep, 1)
    gb["dp"] = (2 * (dp - 1) / dp * dense + 2 * (edp - 1) / edp * expert) * wl.grad_bytes / 1e9
    t_ep = gb["ep"] / hw.nvlink_gbps
    if tp * ep > hw.node_size:  # the share of a rank's EP peers outside its node goes over InfiniBand
        off = 1 - (hw.node_size / tp) / ep
        t_ep = gb["ep"] * (off / hw.ib_gbps + (1 - off) / hw.nvlink_gbps)
    time = {
        "compute": compute,
        "bubble": bubble_units(cfg) * fwd_mb,
        "tp": gb["tp"] / _bandwidth(hw, tp),
        "ep": (1 - hw.overlap) * t_ep,
        "pp": (1 - hw.overlap) * gb["pp"] / _bandwidth(hw, tp * dp * pp),
        "dp": (1 - hw.overlap) * gb["dp"] / _bandwidth(hw, tp * dp),
    }
    est = Estimate(layout=cfg, microbatches=m, runnable=runnable, mem=mem, time=time, comm_gb=gb)
    est.mfu = flops / (est.step_s * hw.gpus * hw.peak_tflops * 1e12)
    est.fits = est.mem_total <= hw.gpu_mem_gib
    return est


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(a: ModelArgs, hw: Hardware, wl: Workload, fixed: dict | None = None):
    """Every tp (inside a node) × pp × ep × dp × schedule × activation checkpointing for `hw.gpus` GPUs
    whose degrees divide what they split; `fixed` pins fields (e.g. {"pp": 16, "ep": 64})."""
    fixed = fixed or {}
    out = []
    tps = [t for t in _divisors(hw.node_size) if hw.gpus % t == 0 and a.n_heads % t == 0]
    for tp in tps:
        for pp in _divisors(hw.gpus // tp):
            dp = hw.gpus // (tp * pp)
            if pp > a.n_layers or wl.global_batch % (dp * wl.micro_batch):
                continue
            m = wl.global_batch // (dp * wl.micro_batch)
            schedules = [PPSchedule.one_f_one_b] if pp == 1 else list(PPSchedule)
            for ep, sched, ac in itertools.product(_divisors(dp), schedules, (False, True)):
                if a.n_routed_experts % ep:
                    continue
                cfg = ParallelConfig(
                    tp=tp,
                    pp=pp,
                    ep=ep,
                    dp=dp,
                    pp_schedule=sched,
                    microbatches=m,
                    sequence_parallel=tp > 1,
                    activation_checkpointing=ac,
                )
                if sched != PPSchedule.one_f_one_b and cfg.n_stages > a.n_layers:
                    continue
                if m < {PPSchedule.one_f_one_b: pp, PPSchedule.dualpipev: 2 * pp}.get(sched, pp) and pp > 1:
                    continue
                if all(_matches(getattr(cfg, k), v) for k, v in fixed.items()):
                    out.append(cfg)
    return out


def _matches(value, want) -> bool:
    return (value.value if hasattr(value, "value") else value) == want


def plan(a: ModelArgs, hw: Hardware, wl: Workload, fixed: dict | None = None) -> list[Estimate]:
    """Every enumerated layout's estimate: those that fit first, fastest first; then the rest by memory."""
    ests = [estimate(a, cfg, hw, wl) for cfg in enumerate_layouts(a, hw, wl, fixed)]
    return sorted(ests, key=lambda e: (not e.fits, e.step_s if e.fits else e.mem_total))


def deepseek_v3_mfu(
    gpu_hours: float = 2.788e6, tokens: float = 14.8e12, seq: int = 4096, peak_tflops: float = 989.0
) -> float:
    """MFU the DeepSeek-V3 report's GPU-hours imply: model FLOPs of 14.8T tokens / (H800 hours × bf16 peak).

    2.788M H800 hours cover pre-training (2.664M), context extension (119K) and post-training (5K);
    all are charged to the 14.8T pre-training tokens, so this slightly understates the pre-training MFU.
    The peak is the dense BF16 one (the run's GEMMs were FP8, whose peak is twice that).
    """
    from r1core.model.args import presets

    return flops_per_token(presets["v3"], seq) * tokens / (gpu_hours * 3600 * peak_tflops * 1e12)


LAYOUT_KEYS = {"tp": int, "pp": int, "ep": int, "pp_schedule": str, "activation_checkpointing": bool}
USAGE = """r1core plan model=v3 gpus=2048 [setting=value ...]

Memory per GPU and estimated step time of every tp x pp x ep x dp layout, schedule and activation
checkpointing choice for `gpus` GPUs; prints those that fit, fastest first, and a JSON line last.
Settings (defaults in brackets):
  model=<tiny|small|v2_lite|v3> [v3]   top=<rows> [10]   runnable_only=<bool> [false: r1core's check_layout]
  hardware: {hw}
  workload: {wl}
  pin a layout field: tp= pp= ep= pp_schedule=<1f1b|interleaved|dualpipev> activation_checkpointing=<bool>
See docs/plan.md for the formulas and what they were checked against."""


def _parse_value(text: str, kind: type):
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    return kind(text)


def parse_settings(argv: list[str]) -> tuple[str, Hardware, Workload, dict, dict]:
    """key=value arguments -> (preset, Hardware, Workload, pinned layout fields, options).

    Errors name the key.
    """
    hw_fields = {f.name: f for f in dataclasses.fields(Hardware)}
    wl_fields = {f.name: f for f in dataclasses.fields(Workload)}
    hw, wl, fixed, opts = {}, {}, {}, {"model": "v3", "top": 10, "runnable_only": False}
    for arg in argv:
        key, sep, text = arg.partition("=")
        if not sep:
            raise ValueError(f"r1core plan: expected setting=value, got {arg!r}")
        try:
            if key in hw_fields:
                hw[key] = _parse_value(text, type(getattr(Hardware(), key)))
            elif key in wl_fields:
                wl[key] = _parse_value(text, type(getattr(Workload(), key)))
            elif key in LAYOUT_KEYS:
                fixed[key] = _parse_value(text, LAYOUT_KEYS[key])
            elif key in opts:
                opts[key] = _parse_value(text, type(opts[key]))
            else:
                known = sorted([*hw_fields, *wl_fields, *LAYOUT_KEYS, *opts])
                raise ValueError(f"unknown setting; known: {', '.join(known)}")
        except ValueError as e:
            raise ValueError(f"r1core plan: {key}={text}: {e}") from None
    return opts.pop("model"), Hardware(**hw), Workload(**wl), fixed, opts


def format_table(ests: list[Estimate]) -> str:
    head = (
        f"{'tp':>3} {'pp':>3} {'ep':>4} {'dp':>5} {'schedule':>11} {'ac':>3} {'mb':>5} | {'GiB':>6} "
        f"{'wgt':>5} {'grad':>5} {'mast':>5} {'opt':>5} {'act':>6} | {'step s':>8} {'comp':>7} "
        f"{'bubl':>6} "
        f"{'tp':>6} {'ep':>6} {'pp':>6} {'dp':>6} | {'MFU':>5} runs in r1core"
    )
    lines = [head, "-" * len(head)]
    for e in ests:
        c, m, t = e.layout, e.mem, e.time
        sched = c.pp_schedule.value if c.pp > 1 else "-"
        lines.append(
            f"{c.tp:>3} {c.pp:>3} {c.ep:>4} {c.dp:>5} {sched:>11} "
            f"{'y' if c.activation_checkpointing else 'n':>3} {e.microbatches:>5} | {e.mem_total:>6.1f} "
            f"{m['weights']:>5.1f} {m['grads']:>5.1f} {m['master']:>5.1f} "
            f"{m['optimizer']:>5.1f} {m['activations']:>6.1f} | {e.step_s:>8.3f} {t['compute']:>7.3f} "
            f"{t['bubble']:>6.3f} {t['tp']:>6.3f} {t['ep']:>6.3f} {t['pp']:>6.3f} {t['dp']:>6.3f} | "
            f"{100 * e.mfu:>4.1f}% {'yes' if not e.runnable else 'no: ' + e.runnable.split(';')[0][:48]}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> list[Estimate]:
    import json

    from r1core.model.args import presets

    if any(a in ("-h", "--help", "help") for a in argv):
        wl_names = " ".join(f"{f.name}=[{getattr(Workload(), f.name)}]" for f in dataclasses.fields(Workload))
        hw_names = " ".join(f"{f.name}=[{getattr(Hardware(), f.name)}]" for f in dataclasses.fields(Hardware))
        print(USAGE.format(hw=hw_names, wl=wl_names))
        return []
    try:
        preset, hw, wl, fixed, opts = parse_settings(argv)
        args = presets[preset]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    except KeyError as e:
        raise SystemExit(f"r1core plan: {e.args[0]}") from None
    ests = plan(args, hw, wl, fixed)
    if opts["runnable_only"]:
        ests = [e for e in ests if not e.runnable]
    fit = [e for e in ests if e.fits]
    c = param_counts(args)
    print(
        f"{preset}: {c.total / 1e9:.1f}B parameters, {c.active / 1e9:.1f}B active, MTP {c.mtp / 1e9:.1f}B; "
        f"{hw.gpus} GPUs of {hw.gpu_mem_gib:g} GiB, {wl.global_batch} x {wl.seq_len} tokens per step, "
        f"{flops_per_token(args, wl.seq_len) / 1e9:.1f} GFLOP/token"
    )
    order = "fastest first:" if fit else "none fits; least memory first:"
    print(f"{len(ests)} layouts, {len(fit)} fit; {order}")
    shown = (fit or ests)[: opts["top"]]
    print(format_table(shown))
    print(
        json.dumps(
            {
                "model": preset,
                "hardware": dataclasses.asdict(hw),
                "workload": dataclasses.asdict(wl),
                "fixed": fixed,
                "n_layouts": len(ests),
                "n_fit": len(fit),
                "layouts": [e.row() for e in shown],
            }
        )
    )
    return ests
