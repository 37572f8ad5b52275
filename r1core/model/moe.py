"""DeepSeekMoE with aux-loss-free balancing (DeepSeek-V3 §2.1.2).

A MoE layer is four swappable steps, each a plain function with a fixed contract so kernels
(`r1core.kernels`) and expert parallelism (`r1core.parallel`) can replace any of them:

    route    logits_TE, bias_E          -> weights_TK (fp32), idx_TK (int64), counts_E (int64)
    permute  x_TD, idx_TK, counts_E     -> x_PD (expert-contiguous rows), pos_TK (row of each copy)
    experts  x_PD, w13_E2ID, w2_EDI, seg_E -> y_PD (SwiGLU per expert segment)
    combine  y_PD, pos_TK, weights_TK   -> y_TD (weighted sum of each token's K rows)

The functions here are the numerical specification; every kernel is tested against them.

Legend: T tokens, D model dim, E routed experts, K experts per token, G expert groups,
P permuted rows (T*K, plus per-expert padding when segments are padded), I expert hidden dim.
The routed experts' gate and up weights are one tensor w13_E2ID [E, 2, I, D] (w13[:, 0] = W1, the gate;
w13[:, 1] = W3, the up projection), so one grouped GEMM computes both and one computes their input gradient.
Segment e of x_PD starts at exclusive_cumsum(seg_E)[e] with seg_E = round_up(counts_E, pad);
rows past a segment's real tokens (padding) and past the last segment are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .args import Impl, ModelArgs, ScoreFunc
from .layers import MLP


@dataclass(frozen=True)
class RouterSpec:
    n_experts: int
    top_k: int
    n_groups: int
    topk_groups: int
    score_func: ScoreFunc
    route_scale: float
    norm_topk_prob: bool

    @classmethod
    def from_args(cls, args: ModelArgs) -> "RouterSpec":
        return cls(
            args.n_routed_experts,
            args.n_activated_experts,
            args.n_expert_groups,
            args.n_limited_groups,
            args.score_func,
            args.route_scale,
            args.norm_topk_prob,
        )


def _topk_lowest_index_first(x: torch.Tensor, k: int) -> torch.Tensor:
    # A stable descending sort breaks ties toward the lower index: the tie rule every kernel follows.
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def router_scores(logits_TE: torch.Tensor, score_func: ScoreFunc) -> torch.Tensor:
    logits_TE = logits_TE.float()
    return logits_TE.sigmoid() if score_func == ScoreFunc.sigmoid else logits_TE.softmax(dim=-1)


def route_ref(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, spec: RouterSpec):
    """Group-limited top-k routing. The bias steers selection only; weights use unbiased scores."""
    T, E = logits_TE.shape
    scores_TE = router_scores(logits_TE, spec.score_func)
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
    if spec.n_groups > 1:
        grouped_TGe = choice_TE.view(T, spec.n_groups, E // spec.n_groups)
        if spec.score_func == ScoreFunc.sigmoid:  # V3: a group scores by its two best experts
            group_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
        else:  # V2: by its best expert
            group_TG = grouped_TGe.amax(dim=-1)
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
        keep_TG.scatter_(1, _topk_lowest_index_first(group_TG, spec.topk_groups), True)
        choice_TE = grouped_TGe.masked_fill(~keep_TG[..., None], float("-inf")).view(T, E)
    idx_TK = _topk_lowest_index_first(choice_TE, spec.top_k)
    weights_TK = scores_TE.gather(1, idx_TK)
    if spec.norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    # scatter_add rather than bincount: no host sync, so routing can sit inside a CUDA graph
    counts_E = torch.zeros(E, dtype=torch.int64, device=idx_TK.device).scatter_add_(
        0, idx_TK.flatten(), torch.ones(idx_TK.numel(), dtype=torch.int64, device=idx_TK.device)
    )
    return weights_TK * spec.route_scale, idx_TK, counts_E


def segment_sizes(counts_E: torch.Tensor, pad_multiple: int = 1) -> torch.Tensor:
    if pad_multiple == 1:
        return counts_E
    return (counts_E + pad_multiple - 1) // pad_multiple * pad_multiple


def permuted_rows(n_tokens: int, top_k: int, n_experts: int, pad_multiple: int = 1) -> int:
    """Static size of x_PD: the worst case over all routings, so no host sync is needed."""
    return n_tokens * top_k + (n_experts * (pad_multiple - 1) if pad_multiple > 1 else 0)


def permute_ref(x_TD: torch.Tensor, idx_TK: torch.Tensor, counts_E: torch.Tensor, pad_multiple: int = 1):
    T, K = idx_TK.shape
    E = counts_E.numel()
    flat = idx_TK.flatten()
    seg_E = segment_sizes(counts_E, pad_multiple)
    seg_start_E = torch.cumsum(seg_E, 0) - seg_E
    tok_start_E = torch.cumsum(counts_E, 0) - counts_E
    order = torch.argsort(flat, stable=True)  # by expert, then by (token, k)
    expert_sorted = flat[order]
    rank = torch.arange(flat.numel(), device=flat.device) - tok_start_E[expert_sorted]
    pos_flat = torch.empty_like(flat)
    pos_flat[order] = seg_start_E[expert_sorted] + rank
    x_PD = x_TD.new_zeros(permuted_rows(T, K, E, pad_multiple), x_TD.shape[1])
    x_PD = x_PD.index_put((pos_flat,), x_TD.repeat_interleave(K, dim=0))
    return x_PD, pos_flat.view(T, K)


def unpermute_ref(y_PD: torch.Tensor, pos_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    y_TKD = y_PD[pos_TK].float() * weights_TK.float()[..., None]
    return y_TKD.sum(dim=1).to(y_PD.dtype)


def grouped_swiglu_ref(x_PD, w1_EID, w2_EDI, w3_EID, seg_E) -> torch.Tensor:
    """Per-expert SwiGLU over consecutive row segments; rows past the last segment stay zero."""
    y_PD = torch.zeros_like(x_PD)
    start = 0
    for e, n in enumerate(seg_E.tolist()):
        if n:
            xs = x_PD[start : start + n]
            y = (F.silu(xs @ w1_EID[e].T) * (xs @ w3_EID[e].T)) @ w2_EDI[e].T
            y_PD = y_PD.index_copy(0, torch.arange(start, start + n, device=x_PD.device), y)
        start += n
    return y_PD


def grouped_swiglu_stacked_ref(x_PD, w13_E2ID, w2_EDI, seg_E) -> torch.Tensor:
    """`grouped_swiglu_ref` with the gate and up weights stacked as the model stores them."""
    return grouped_swiglu_ref(x_PD, w13_E2ID[:, 0], w2_EDI, w13_E2ID[:, 1], seg_E)


def seq_balance_loss(
    logits_BTE: torch.Tensor, idx_BTK: torch.Tensor, spec: RouterSpec, seq_sum: Callable | None = None
) -> torch.Tensor:
    """Complementary sequence-wise balance loss (DeepSeek-V3 eq. 17-20), without its alpha.

    f_i = E / (K T) * #{t : i in topk_t};  P_i = mean_t s'_{i,t},  s' = s / sum_j s_j;  L = sum_i f_i P_i.
    Averaged over the sequences of the batch. Under context parallelism a rank holds part of every
    sequence: `seq_sum` sums the routing counts and T over the sequence's ranks (no gradient), and
    the rank's own tokens' s' give its share of L; the shares add up to L.
    """
    B, T, E = logits_BTE.shape
    scores = router_scores(logits_BTE, spec.score_func)
    probs_sum_BE = (scores / scores.sum(dim=-1, keepdim=True)).sum(dim=1)
    counts = torch.zeros(B, E + 1, device=logits_BTE.device)  # hits per expert, then T
    counts[:, E] = T
    ones = torch.ones(B, T * spec.top_k, device=logits_BTE.device)
    counts[:, :E].scatter_add_(1, idx_BTK.reshape(B, -1), ones)
    if seq_sum is not None:
        counts = seq_sum(counts)
    hits_BE, n_B1 = counts[:, :E], counts[:, E:]
    f_BE = hits_BE * (E / spec.top_k) / n_B1
    return (f_BE * probs_sum_BE / n_B1).sum(dim=-1).mean()


class MoEOps(NamedTuple):
    """One implementation of the four steps, with the contracts of the module docstring."""

    route: Callable
    permute: Callable
    unpermute: Callable
    experts: Callable  # grouped SwiGLU over expert segments: (x_PD, w13_E2ID, w2_EDI, seg_E) -> y_PD


REF_OPS = MoEOps(route_ref, permute_ref, unpermute_ref, grouped_swiglu_stacked_ref)

# Impl -> MoEOps, or a no-argument loader of them (called once, at first use). The model knows only
# its reference; `r1core.kernels` registers "triton" and "cuda" when imported (the trainer and the
# rollout engines import it), so the model never imports kernel code.
_REGISTRY: dict[Impl, MoEOps | Callable[[], MoEOps]] = {Impl.ref: REF_OPS}


def register_moe_ops(impl: Impl | str, ops: MoEOps | Callable[[], MoEOps]) -> None:
    _REGISTRY[Impl(impl)] = ops


def moe_ops(impl: Impl | str) -> MoEOps:
    impl = Impl(impl)
    entry = _REGISTRY.get(impl)
    if entry is None:
        raise LookupError(
            f"model.moe_impl={impl.value}: no MoE ops are registered for it; "
            "`import r1core.kernels` registers triton and cuda"
        )
    if not isinstance(entry, MoEOps):
        entry = _REGISTRY[impl] = entry()
    return entry


class Gate(nn.Module):
    """Router weights, the aux-free selection bias and the running per-expert load."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.spec = RouterSpec.from_args(args)
        self.bias_update_speed = args.bias_update_speed
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        if args.score_func == ScoreFunc.sigmoid:
            self.register_buffer(
                "e_score_correction_bias", torch.zeros(args.n_routed_experts, dtype=torch.float32)
            )
        else:
            self.e_score_correction_bias = None
        # Tokens routed to each expert since the last bias update (training only).
        self.register_buffer(
            "expert_load", torch.zeros(args.n_routed_experts, dtype=torch.float32), persistent=False
        )

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        # The GEMM runs in the activation dtype (fp32 accumulation inside cuBLAS) and scoring in fp32,
        # as DeepSeek-V3's reference inference does: an fp32 GEMM at V3 shapes costs ~1 ms alone.
        return F.linear(x_TD, self.weight.to(x_TD.dtype)).float()


class GroupedExperts(nn.Module):
    """Routed experts stored as stacked weights, the layout grouped GEMMs want.

    w13: [E, 2, I, D], the gate (w13[:, 0], HF `gate_proj`) and up (w13[:, 1], `up_proj`) projections of
    every expert, so that per expert [gate; up] is one [2I, D] matrix: one grouped GEMM gives both
    projections and one gives their input gradient (two GEMMs and an add with separate weights).
    w2: [E, D, I] (down). `w1` and `w3` are views of w13's halves. Under expert parallelism
    `r1core.parallel` keeps only this rank's slice (E on dim 0, I on dim 2 under TP) and records which
    global experts it holds. State dicts written before w13 existed (`w1`, `w3`) still load.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(n_experts, 2, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.impl = Impl.ref

    @property
    def w1(self) -> torch.Tensor:
        return self.w13[:, 0]

    @property
    def w3(self) -> torch.Tensor:
        return self.w13[:, 1]

    def forward(self, x_PD: torch.Tensor, seg_E: torch.Tensor) -> torch.Tensor:
        return moe_ops(self.impl).experts(x_PD, self.w13, self.w2, seg_E)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = prefix + "w1", prefix + "w3"
        if prefix + "w13" not in state_dict and all(k in state_dict for k in old):
            state_dict[prefix + "w13"] = torch.stack([state_dict.pop(k) for k in old], dim=1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LocalDispatcher:
    """Single-device dispatch: permute rows to expert order and back."""

    def __init__(self, n_experts: int, impl: Impl = Impl.ref, pad_multiple: int = 1):
        self.n_experts = n_experts
        self.impl = impl
        self.pad_multiple = pad_multiple

    def dispatch(self, x_TD, idx_TK, counts_E):
        x_PD, pos_TK = moe_ops(self.impl).permute(x_TD, idx_TK, counts_E, self.pad_multiple)
        return x_PD, segment_sizes(counts_E, self.pad_multiple), pos_TK

    def combine(self, y_PD, weights_TK, pos_TK):
        return moe_ops(self.impl).unpermute(y_PD, pos_TK, weights_TK)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.impl = args.moe_impl
        self.gate = Gate(args)
        self.experts = GroupedExperts(args.n_routed_experts, args.dim, args.moe_inter_dim)
        self.experts.impl = args.moe_impl
        self.shared_experts = (
            MLP(args.dim, args.n_shared_experts * args.moe_inter_dim) if args.n_shared_experts else None
        )
        self.dispatcher = LocalDispatcher(args.n_routed_experts, args.moe_impl)
        self.seq_sum: Callable | None = None  # see seq_balance_loss; set by context parallelism

    def set_impl(self, impl: Impl) -> None:
        self.impl = self.experts.impl = self.dispatcher.impl = Impl(impl)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, D = x.shape
        x_TD = x.reshape(-1, D)
        logits_TE = self.gate.logits(x_TD)
        route = moe_ops(self.impl).route
        weights_TK, idx_TK, counts_E = route(logits_TE, self.gate.e_score_correction_bias, self.gate.spec)
        aux = None
        if self.training:
            with torch.no_grad():
                self.gate.expert_load += counts_E.to(self.gate.expert_load.dtype)
            if self.args.seq_aux_alpha > 0:
                aux = self.args.seq_aux_alpha * seq_balance_loss(
                    logits_TE.view(B, T, -1), idx_TK.view(B, T, -1), self.gate.spec, self.seq_sum
                )
        x_PD, seg_E, state = self.dispatcher.dispatch(x_TD, idx_TK, counts_E)
        y_TD = self.dispatcher.combine(self.experts(x_PD, seg_E), weights_TK, state)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(B, T, D), aux


@torch.no_grad()
def update_expert_bias(
    gate: Gate, load_E: torch.Tensor | None = None, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Aux-loss-free balancing step: b_i += gamma * sign(mean load - load_i); returns the load used.

    `load_E` overrides the gate's own running load (the parallel trainer passes the load
    all-reduced over data-parallel ranks so every rank applies the same update). `keep`, a 0/1 device
    scalar, scales the update (0: a skipped step, decided on the device without a host sync).
    """
    load_E = gate.expert_load.clone() if load_E is None else load_E
    if gate.e_score_correction_bias is not None and gate.bias_update_speed:
        step_E = gate.bias_update_speed * torch.sign(load_E.mean() - load_E)
        gate.e_score_correction_bias += step_E if keep is None else step_E * keep
    gate.expert_load.zero_()
    return load_E
