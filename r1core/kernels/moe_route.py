"""Fused MoE router: scores, aux-free bias, group-limited top-k, normalisation and counts in one kernel.

Legend: T tokens, E routed experts, K experts per token, G expert groups.

The gate GEMM stays in cuBLAS (`Gate.logits`); this kernel starts from the fp32 logits, reads each
row once and writes only weights_TK, idx_TK and counts_E (DeepSeek-V3 §2.1.2 eq. 12-16 and §2.1.3;
DeepSeek-V2 §2.1.3 for softmax scores with group max):

    s = sigmoid(l) | softmax(l)              scores, fp32
    c = s + b                                choice scores: the bias steers selection only
    group_j = top2-sum_j(c) | max_j(c)       keep the `topk_groups` best groups
    idx = top-K of c over the kept groups    ties go to the lower group / expert index
    w = route_scale * s[idx] / (sum_k s[idx] + 1e-20)    (the division only when norm_topk_prob)

Backward (grad of weights -> grad of logits; idx is piecewise constant):
    with S = sum_k s[idx_k] + 1e-20 and g = dL/dw:
    dL/ds[idx_k] = scale * (g_k / S - sum_j g_j s[idx_j] / S^2)   (scale * g_k without normalisation)
    sigmoid: dL/dl = dL/ds * s * (1 - s);   softmax: dL/dl = s * (dL/ds - sum_e dL/ds_e s_e)

Selection is exact against `route_ref` when the scores are bit-identical: on CUDA the kernel uses
libdevice expf and IEEE division, the operations torch's sigmoid / softmax kernels use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from r1core.model.args import ScoreFunc
from r1core.model.moe import RouterSpec, route_ref

__all__ = ["moe_route", "moe_route_ref"]


def moe_route_ref(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, spec: RouterSpec):
    """Readable PyTorch routing: `r1core.model.moe.route_ref` (the specification)."""
    return route_ref(logits_TE, bias_E, spec)


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    # libdevice expf is what torch's CUDA kernels call; tl.exp lowers to the faster ex2.approx.
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _row_scores(l, valid, col_ok, SIGMOID: tl.constexpr, PRECISE: tl.constexpr):
    """Scores of a [BLOCK_T, BLOCK_E] tile of fp32 logits, torch's formulas (1/(1+e^-x), e^(x-m)/sum)."""
    if SIGMOID:
        s = tl.math.div_rn(tl.full(l.shape, 1.0, tl.float32), 1.0 + _exp(-l, PRECISE))
    else:
        l = tl.where(col_ok[None, :], l, float("-inf"))  # padded rows keep finite logits: no inf - inf
        e = _exp(l - tl.max(l, axis=1)[:, None], PRECISE)
        s = tl.math.div_rn(e, tl.sum(e, axis=1)[:, None])
    return tl.where(valid, s, 0.0)


@triton.jit
def _load_scores(logits_ptr, stride_t, rows, cols, T, E, SIGMOID: tl.constexpr, PRECISE: tl.constexpr):
    valid = (rows < T)[:, None] & (cols < E)[None, :]
    l = tl.load(logits_ptr + rows[:, None] * stride_t + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    return _row_scores(l, valid, cols < E, SIGMOID, PRECISE)


@triton.jit
def _keep_groups(
    choice,
    cols,
    E,
    SIGMOID: tl.constexpr,
    N_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Mask of the experts in each row's `TOPK_GROUPS` best groups (ties toward the lower group)."""
    NEG: tl.constexpr = float("-inf")
    gid = cols // GROUP_SIZE
    # Each column carries its group's score, so group selection stays in the [T, E] tile layout.
    gscore = tl.full(choice.shape, NEG, tl.float32)
    for g in tl.static_range(N_GROUPS):
        in_g = (gid == g)[None, :]
        v = tl.where(in_g, choice, NEG)
        m1 = tl.max(v, axis=1)
        if SIGMOID:  # top-2 sum: drop one occurrence of the max, so a tied pair sums to 2*max
            first = tl.min(tl.where(v == m1[:, None], cols[None, :], BLOCK_E), axis=1)
            m2 = tl.max(tl.where(cols[None, :] == first[:, None], NEG, v), axis=1)
            gs = m1 + m2
        else:
            gs = m1
        gscore = tl.where(in_g, gs[:, None], gscore)
    keep = tl.zeros(choice.shape, tl.int1)
    avail = tl.broadcast_to((cols < E)[None, :], choice.shape)
    for _ in tl.static_range(TOPK_GROUPS):
        m = tl.max(tl.where(avail, gscore, NEG), axis=1)
        sel = tl.min(tl.where(avail & (gscore == m[:, None]), gid[None, :], N_GROUPS), axis=1)
        hit = gid[None, :] == sel[:, None]
        keep = keep | hit
        avail = avail & ~hit
    return keep


@triton.jit
def _route_fwd_kernel(
    logits_ptr,
    bias_ptr,
    w_ptr,
    idx_ptr,
    counts_ptr,
    T,
    E,
    stride_t,
    route_scale,
    HAS_BIAS: tl.constexpr,
    SIGMOID: tl.constexpr,
    N_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    NORM: tl.constexpr,
    PRECISE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    NEG: tl.constexpr = float("-inf")
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    s = _load_scores(logits_ptr, stride_t, rows, cols, T, E, SIGMOID, PRECISE)
    choice = s
    if HAS_BIAS:
        choice = s + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(col_ok[None, :], choice, NEG)
    if N_GROUPS > 1:
        keep = _keep_groups(choice, cols, E, SIGMOID, N_GROUPS, TOPK_GROUPS, GROUP_SIZE, BLOCK_E)
        choice = tl.where(keep, choice, NEG)
    kcols = tl.arange(0, K_PAD)
    w_TK = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    idx_TK = tl.zeros((BLOCK_T, K_PAD), tl.int64)
    cnt = tl.zeros((BLOCK_E,), tl.int32)
    avail = tl.broadcast_to(col_ok[None, :], choice.shape)
    for k in tl.static_range(K):
        m = tl.max(tl.where(avail, choice, NEG), axis=1)
        sel = tl.min(tl.where(avail & (choice == m[:, None]), cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == sel[:, None]
        avail = avail & ~hit
        w = tl.sum(tl.where(hit, s, 0.0), axis=1)
        w_TK = tl.where(kcols[None, :] == k, w[:, None], w_TK)
        idx_TK = tl.where(kcols[None, :] == k, sel.to(tl.int64)[:, None], idx_TK)
        cnt += tl.sum((hit & row_ok[:, None]).to(tl.int32), axis=0)
    if NORM:
        w_TK = w_TK / (tl.sum(w_TK, axis=1)[:, None] + 1e-20)
    w_TK = w_TK * route_scale
    out_mask = row_ok[:, None] & (kcols < K)[None, :]
    tl.store(w_ptr + rows[:, None] * K + kcols[None, :], w_TK, mask=out_mask)
    tl.store(idx_ptr + rows[:, None] * K + kcols[None, :], idx_TK, mask=out_mask)
    tl.atomic_add(counts_ptr + cols, cnt.to(tl.int64), mask=col_ok & (cnt > 0))


@triton.jit
def _route_bwd_kernel(
    logits_ptr,
    idx_ptr,
    gw_ptr,
    glogits_ptr,
    T,
    E,
    stride_t,
    route_scale,
    SIGMOID: tl.constexpr,
    K: tl.constexpr,
    NORM: tl.constexpr,
    PRECISE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    s = _load_scores(logits_ptr, stride_t, rows, cols, T, E, SIGMOID, PRECISE)
    total = tl.zeros((BLOCK_T,), tl.float32)
    gs_dot = tl.zeros((BLOCK_T,), tl.float32)
    for k in tl.static_range(K):
        i_k = tl.load(idx_ptr + rows * K + k, mask=row_ok, other=-1)
        g_k = tl.load(gw_ptr + rows * K + k, mask=row_ok, other=0.0).to(tl.float32)
        s_k = tl.sum(tl.where(cols[None, :] == i_k[:, None], s, 0.0), axis=1)
        total += s_k
        gs_dot += g_k * s_k
    total += 1e-20
    grad_s = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    for k in tl.static_range(K):
        i_k = tl.load(idx_ptr + rows * K + k, mask=row_ok, other=-1)
        g_k = tl.load(gw_ptr + rows * K + k, mask=row_ok, other=0.0).to(tl.float32)
        if NORM:
            g_k = g_k / total - gs_dot / (total * total)
        grad_s += tl.where(cols[None, :] == i_k[:, None], (route_scale * g_k)[:, None], 0.0)
    if SIGMOID:
        grad_l = grad_s * s * (1.0 - s)
    else:
        grad_l = s * (grad_s - tl.sum(grad_s * s, axis=1)[:, None])
    mask = row_ok[:, None] & (cols < E)[None, :]
    tl.store(glogits_ptr + rows[:, None] * E + cols[None, :], grad_l, mask=mask)


# Eight warps: with four, the 16 x 256 V3 tile needs 255 registers and spills (ptxas -v, sm_90a).
_NUM_WARPS = 8


def _tile_shape(E: int) -> tuple[int, int]:
    block_e = triton.next_power_of_2(E)
    # ~4K fp32 scores per program: the whole row stays in registers through every top-k round.
    return max(1, min(64, 4096 // block_e)), block_e


def _check(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, spec: RouterSpec) -> None:
    if logits_TE.dim() != 2 or not logits_TE.is_floating_point():
        raise ValueError(
            f"moe_route: logits_TE must be a 2-D float tensor, got {tuple(logits_TE.shape)} {logits_TE.dtype}"
        )
    E = logits_TE.shape[1]
    if E != spec.n_experts:
        raise ValueError(f"moe_route: logits_TE has {E} experts, spec.n_experts={spec.n_experts}")
    if bias_E is not None and (bias_E.shape != (E,) or bias_E.device != logits_TE.device):
        raise ValueError(
            f"moe_route: bias_E must be [{E}] on {logits_TE.device}, "
            f"got {tuple(bias_E.shape)} on {bias_E.device}"
        )
    groups = max(spec.n_groups, 1)
    if E % groups or not 1 <= spec.topk_groups <= groups:
        raise ValueError(
            f"moe_route: n_experts={E} / n_groups={spec.n_groups} / topk_groups={spec.topk_groups} invalid"
        )
    kept = spec.topk_groups * (E // groups) if groups > 1 else E
    if not 1 <= spec.top_k <= kept:
        raise ValueError(f"moe_route: top_k={spec.top_k} must be in [1, {kept}] (experts in the kept groups)")
    if groups > 1 and spec.score_func == ScoreFunc.sigmoid and E // groups < 2:
        raise ValueError("moe_route: sigmoid group scores are top-2 sums: need >= 2 experts per group")


def _route_fwd(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, spec: RouterSpec):
    _check(logits_TE, bias_E, spec)
    logits_TE = logits_TE if logits_TE.stride(1) == 1 else logits_TE.contiguous()
    T, E = logits_TE.shape
    K = spec.top_k
    dev = logits_TE.device
    weights_TK = torch.empty(T, K, device=dev, dtype=torch.float32)
    idx_TK = torch.empty(T, K, device=dev, dtype=torch.int64)
    counts_E = torch.zeros(E, device=dev, dtype=torch.int64)
    if T == 0:
        return weights_TK, idx_TK, counts_E
    block_t, block_e = _tile_shape(E)
    groups = max(spec.n_groups, 1)
    bias = bias_E.contiguous() if bias_E is not None else logits_TE  # dummy pointer when HAS_BIAS=False
    _route_fwd_kernel[(triton.cdiv(T, block_t),)](
        logits_TE,
        bias,
        weights_TK,
        idx_TK,
        counts_E,
        T,
        E,
        logits_TE.stride(0),
        float(spec.route_scale),
        HAS_BIAS=bias_E is not None,
        SIGMOID=spec.score_func == ScoreFunc.sigmoid,
        N_GROUPS=groups,
        TOPK_GROUPS=spec.topk_groups,
        GROUP_SIZE=E // groups,
        K=K,
        K_PAD=triton.next_power_of_2(K),
        NORM=bool(spec.norm_topk_prob),
        PRECISE=logits_TE.is_cuda,
        BLOCK_T=block_t,
        BLOCK_E=block_e,
        num_warps=_NUM_WARPS,
    )
    return weights_TK, idx_TK, counts_E


def _route_bwd(logits_TE: torch.Tensor, idx_TK: torch.Tensor, grad_w_TK: torch.Tensor, spec: RouterSpec):
    T, E = logits_TE.shape
    grad_w_TK = grad_w_TK.contiguous()
    grad_TE = torch.empty(T, E, device=logits_TE.device, dtype=torch.float32)
    if T:
        block_t, block_e = _tile_shape(E)
        _route_bwd_kernel[(triton.cdiv(T, block_t),)](
            logits_TE,
            idx_TK,
            grad_w_TK,
            grad_TE,
            T,
            E,
            logits_TE.stride(0),
            float(spec.route_scale),
            SIGMOID=spec.score_func == ScoreFunc.sigmoid,
            K=spec.top_k,
            NORM=bool(spec.norm_topk_prob),
            PRECISE=logits_TE.is_cuda,
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            num_warps=_NUM_WARPS,
        )
    return grad_TE.to(logits_TE.dtype)


# Forward and backward are torch custom ops: torch.compile sees each as one opaque node (no graph break at
# the Triton launches, which dynamo cannot trace under the CPU interpreter), and inductor fuses around them.
# RouterSpec travels as its fields (custom ops take tensors and scalars). Outputs are contiguous.


def _spec(n_experts, top_k, n_groups, topk_groups, score_func, route_scale, norm) -> RouterSpec:
    return RouterSpec(n_experts, top_k, n_groups, topk_groups, ScoreFunc(score_func), route_scale, norm)


@torch.library.custom_op("r1core::moe_route_fwd", mutates_args=())
def _route_fwd_op(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor | None,
    n_experts: int,
    top_k: int,
    n_groups: int,
    topk_groups: int,
    score_func: str,
    route_scale: float,
    norm: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = _spec(n_experts, top_k, n_groups, topk_groups, score_func, route_scale, norm)
    return _route_fwd(logits_TE, bias_E, spec)


@_route_fwd_op.register_fake
def _(logits_TE, bias_E, n_experts, top_k, n_groups, topk_groups, score_func, route_scale, norm):
    T, E = logits_TE.shape
    return (
        logits_TE.new_empty(T, top_k, dtype=torch.float32),
        logits_TE.new_empty(T, top_k, dtype=torch.int64),
        logits_TE.new_empty(E, dtype=torch.int64),
    )


@torch.library.custom_op("r1core::moe_route_bwd", mutates_args=())
def _route_bwd_op(
    logits_TE: torch.Tensor,
    idx_TK: torch.Tensor,
    grad_w_TK: torch.Tensor,
    top_k: int,
    score_func: str,
    route_scale: float,
    norm: bool,
) -> torch.Tensor:
    spec = RouterSpec(logits_TE.shape[1], top_k, 1, 1, ScoreFunc(score_func), route_scale, norm)
    logits_TE = logits_TE if logits_TE.stride(1) == 1 else logits_TE.contiguous()
    return _route_bwd(logits_TE, idx_TK, grad_w_TK, spec)


@_route_bwd_op.register_fake
def _(logits_TE, idx_TK, grad_w_TK, top_k, score_func, route_scale, norm):
    return torch.empty_like(logits_TE, memory_format=torch.contiguous_format)


def _route_setup_context(ctx, inputs, output):
    logits_TE, _, _, top_k, _, _, score_func, route_scale, norm = inputs
    ctx.save_for_backward(logits_TE, output[1])
    ctx.route = (top_k, score_func, route_scale, norm)


def _route_backward(ctx, grad_w_TK, _grad_idx, _grad_counts):
    logits_TE, idx_TK = ctx.saved_tensors
    grad = None
    if grad_w_TK is not None and ctx.needs_input_grad[0]:
        grad = _route_bwd_op(logits_TE, idx_TK, grad_w_TK, *ctx.route)
    return (grad, *[None] * 8)


_route_fwd_op.register_autograd(_route_backward, setup_context=_route_setup_context)


def moe_route(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, spec: RouterSpec):
    """Fused group-limited top-k routing with `route_ref`'s contract.

    Returns (weights_TK fp32, idx_TK int64, counts_E int64); differentiable in logits_TE (through
    weights_TK). The bias is a selection-only buffer and gets no gradient.
    """
    _check(logits_TE, bias_E, spec)
    return _route_fwd_op(
        logits_TE,
        bias_E,
        spec.n_experts,
        spec.top_k,
        spec.n_groups,
        spec.topk_groups,
        ScoreFunc(spec.score_func).value,
        float(spec.route_scale),
        bool(spec.norm_topk_prob),
    )
