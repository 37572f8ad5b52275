"""Token permute / unpermute for MoE dispatch: expert-contiguous rows and the weighted combine.

Legend: T tokens, D model dim, E routed experts, K experts per token, P permuted rows (static:
T*K, plus E*(pad-1) when segments are padded), F = T*K flat (token, k) entries.

    permute:    x_PD[pos[t,k]] = x_TD[t];  padding rows and rows past the last segment are zero
    unpermute:  y_TD[t] = sum_k w[t,k] * y_PD[pos[t,k]]   (fp32 accumulation, y's dtype)

with pos[t,k] = seg_start[e] + #{(t',k') before (t,k) in flat order with idx = e},  e = idx[t,k],
seg_start = exclusive_cumsum(round_up(counts, pad)) (a stable counting sort, as `permute_ref`'s
stable argsort). The ranks come from three small kernels without a host sync: per-block
histograms of F, a per-expert scan over blocks, then in-block ranks. The row copies read each
source row once and write each destination row once, so they are bound by HBM bandwidth:
T*D reads + T*K*D writes for permute, the reverse for unpermute.

Backward: permute's is the unweighted gather (grad_x[t] = sum_k grad_x_PD[pos[t,k]]); unpermute's
scatters w[t,k] * grad_y[t] to row pos[t,k] and reduces grad_w[t,k] = <grad_y[t], y_PD[pos[t,k]]>.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1core.model.moe import permute_ref, permuted_rows, unpermute_ref

__all__ = ["moe_permute", "moe_permute_ref", "moe_unpermute", "moe_unpermute_ref"]

moe_permute_ref = permute_ref
moe_unpermute_ref = unpermute_ref

_BLOCK_F = 128  # flat entries per histogram / rank block: the in-block rank is a BLOCK_F^2 compare
# Eight warps for the 128 x 128 rank / histogram tiles and the 16 x 512 row tiles: with four,
# ptxas (sm_90a) spills in _pos_kernel, _hist_kernel and _gather_rows_kernel.
_NUM_WARPS = 8


@triton.jit
def _hist_kernel(idx_ptr, hist_ptr, F, E, BLOCK_F: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(0)
    f = b * BLOCK_F + tl.arange(0, BLOCK_F)
    e_f = tl.load(idx_ptr + f, mask=f < F, other=-1)
    for e0 in range(0, E, BLOCK_E):
        cols = e0 + tl.arange(0, BLOCK_E)
        c = tl.sum((e_f[:, None] == cols[None, :]).to(tl.int32), axis=0)
        tl.store(hist_ptr + b * E + cols, c, mask=cols < E)


@triton.jit
def _scan_kernel(
    hist_ptr, counts_ptr, base_ptr, NB, E, PAD: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr
):
    """base[b, e] = seg_start[e] + sum_{b' < b} hist[b', e] for this program's experts."""
    e_lo = tl.program_id(0) * BLOCK_E
    ar = tl.arange(0, BLOCK_E)
    seg_before = tl.zeros((BLOCK_E,), tl.int64)
    for e0 in range(0, e_lo, BLOCK_E):
        c = tl.load(counts_ptr + e0 + ar, mask=e0 + ar < E, other=0)
        seg_before += (c + PAD - 1) // PAD * PAD
    before = tl.sum(seg_before, axis=0)
    cols = e_lo + ar
    seg = (tl.load(counts_ptr + cols, mask=cols < E, other=0) + PAD - 1) // PAD * PAD
    running = before + tl.cumsum(seg, axis=0) - seg
    for b0 in range(0, NB, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        mask = (rb < NB)[:, None] & (cols < E)[None, :]
        h = tl.load(hist_ptr + rb[:, None] * E + cols[None, :], mask=mask, other=0).to(tl.int64)
        tl.store(
            base_ptr + rb[:, None] * E + cols[None, :], running[None, :] + tl.cumsum(h, axis=0) - h, mask=mask
        )
        running += tl.sum(h, axis=0)


@triton.jit
def _pos_kernel(idx_ptr, base_ptr, pos_ptr, F, E, BLOCK_F: tl.constexpr):
    b = tl.program_id(0)
    j = tl.arange(0, BLOCK_F)
    f = b * BLOCK_F + j
    ok = f < F
    e_f = tl.load(idx_ptr + f, mask=ok, other=-1)
    earlier_same = (e_f[:, None] == e_f[None, :]) & (j[None, :] < j[:, None])
    rank = tl.sum(earlier_same.to(tl.int64), axis=1)
    pos = tl.load(base_ptr + b * E + e_f, mask=ok, other=0) + rank
    tl.store(pos_ptr + f, pos, mask=ok)


@triton.jit
def _scatter_rows_kernel(
    src_ptr,
    pos_ptr,
    w_ptr,
    out_ptr,
    y_ptr,
    dot_ptr,
    T,
    D,
    stride_src,
    K: tl.constexpr,
    HAS_W: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[pos[t,k]] = (w[t,k] *) src[t]; with DOT also dot[t,k,pid_d] = <src[t], y[pos[t,k]]>
    on this D block."""
    pid_d = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < T
    mask = t_ok[:, None] & (d < D)[None, :]
    src = tl.load(src_ptr + t.to(tl.int64)[:, None] * stride_src + d[None, :], mask=mask, other=0.0)
    for k in tl.static_range(K):
        p = tl.load(pos_ptr + t * K + k, mask=t_ok, other=0)
        rows = p[:, None] * D + d[None, :]
        if HAS_W:
            w = tl.load(w_ptr + t * K + k, mask=t_ok, other=0.0).to(tl.float32)
            tl.store(
                out_ptr + rows, (src.to(tl.float32) * w[:, None]).to(out_ptr.dtype.element_ty), mask=mask
            )
        else:
            tl.store(out_ptr + rows, src, mask=mask)
        if DOT:
            y = tl.load(y_ptr + rows, mask=mask, other=0.0).to(tl.float32)
            part = tl.sum(src.to(tl.float32) * y, axis=1)
            tl.store(dot_ptr + (t * K + k) * tl.num_programs(1) + pid_d, part, mask=t_ok)


@triton.jit
def _gather_rows_kernel(
    src_ptr,
    pos_ptr,
    w_ptr,
    out_ptr,
    T,
    D,
    K: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t] = sum_k (w[t,k] *) src[pos[t,k]], accumulated in fp32 in k order (as unpermute_ref)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < T
    mask = t_ok[:, None] & (d < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for k in tl.static_range(K):
        p = tl.load(pos_ptr + t * K + k, mask=t_ok, other=0)
        v = tl.load(src_ptr + p[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + t * K + k, mask=t_ok, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(out_ptr + t.to(tl.int64)[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _zero_unmarked_rows_kernel(out_ptr, marks_ptr, P, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    empty = tl.load(marks_ptr + r, mask=r < P, other=1) == 0
    if tl.sum(empty.to(tl.int32), axis=0) > 0:  # most blocks hold no padding row: skip their D loop
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            zeros = tl.zeros((BLOCK_R, BLOCK_D), out_ptr.dtype.element_ty)
            tl.store(
                out_ptr + r.to(tl.int64)[:, None] * D + d[None, :],
                zeros,
                mask=empty[:, None] & (d < D)[None, :],
            )


def _row_tiles(T: int, D: int) -> tuple[int, int, tuple[int, int]]:
    block_d = min(512, triton.next_power_of_2(D))
    block_t = max(1, min(16, 8192 // block_d))
    return block_t, block_d, (triton.cdiv(T, block_t), triton.cdiv(D, block_d))


def _positions(idx_TK: torch.Tensor, counts_E: torch.Tensor, pad_multiple: int) -> torch.Tensor:
    """pos_TK (int64) of the stable counting sort, from three launches and no host sync."""
    T, K = idx_TK.shape
    E = counts_E.numel()
    F = T * K
    nb = triton.cdiv(F, _BLOCK_F)
    dev = idx_TK.device
    hist = torch.empty(nb, E, device=dev, dtype=torch.int32)
    base = torch.empty(nb, E, device=dev, dtype=torch.int64)
    pos_TK = torch.empty(T, K, device=dev, dtype=torch.int64)
    if F == 0:
        return pos_TK
    _hist_kernel[(nb,)](
        idx_TK, hist, F, E, BLOCK_F=_BLOCK_F, BLOCK_E=min(64, triton.next_power_of_2(E)), num_warps=_NUM_WARPS
    )
    # The scan is latency-bound (a chain of load -> cumsum -> store over the blocks): few, wide trips.
    scan_e = min(16, triton.next_power_of_2(E))
    _scan_kernel[(triton.cdiv(E, scan_e),)](
        hist,
        counts_E,
        base,
        nb,
        E,
        PAD=pad_multiple,
        BLOCK_B=min(256, triton.next_power_of_2(nb)),
        BLOCK_E=scan_e,
    )
    _pos_kernel[(nb,)](idx_TK, base, pos_TK, F, E, BLOCK_F=_BLOCK_F, num_warps=_NUM_WARPS)
    return pos_TK


def _zero_unmarked_rows(out_PD: torch.Tensor, marks_P: torch.Tensor) -> None:
    P, D = out_PD.shape
    block_d = min(512, triton.next_power_of_2(D))
    _zero_unmarked_rows_kernel[(triton.cdiv(P, 64),)](out_PD, marks_P, P, D, BLOCK_R=64, BLOCK_D=block_d)


def _gather(src_PD: torch.Tensor, pos_TK: torch.Tensor, w_TK: torch.Tensor | None, dtype: torch.dtype):
    T, K = pos_TK.shape
    D = src_PD.shape[1]
    out_TD = torch.empty(T, D, device=src_PD.device, dtype=dtype)
    if T and D:
        block_t, block_d, grid = _row_tiles(T, D)
        _gather_rows_kernel[grid](
            src_PD,
            pos_TK,
            w_TK if w_TK is not None else src_PD,
            out_TD,
            T,
            D,
            K=K,
            HAS_W=w_TK is not None,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            num_warps=_NUM_WARPS,
        )
    return out_TD


def _scatter(src_TD, pos_TK, w_TK, P: int, dtype, y_PD=None):
    """Rows of src to their K destinations (scaled by w); with y_PD also returns
    <src[t], y_PD[pos]> [T, K]."""
    T, K = pos_TK.shape
    D = src_TD.shape[1]
    out_PD = torch.empty(P, D, device=src_TD.device, dtype=dtype)
    block_t, block_d, grid = _row_tiles(T, D)
    dots = torch.empty(T, K, grid[1], device=src_TD.device, dtype=torch.float32) if y_PD is not None else None
    if T and D:
        _scatter_rows_kernel[grid](
            src_TD,
            pos_TK,
            w_TK if w_TK is not None else src_TD,
            out_PD,
            y_PD if y_PD is not None else out_PD,
            dots if dots is not None else out_PD,
            T,
            D,
            src_TD.stride(0),
            K=K,
            HAS_W=w_TK is not None,
            DOT=y_PD is not None,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            num_warps=_NUM_WARPS,
        )
    if P > T * K:  # padding rows and the tail receive no token: zero just them, never a P x D memset
        marks = torch.zeros(P, device=src_TD.device, dtype=torch.int8)
        marks.index_fill_(0, pos_TK.flatten(), 1)
        _zero_unmarked_rows(out_PD, marks)
    return out_PD, (dots.sum(dim=-1) if dots is not None else None)


def _check_permute(x_TD, idx_TK, counts_E, pad_multiple) -> None:
    if x_TD.dim() != 2 or x_TD.stride(-1) != 1:
        raise ValueError(
            f"moe_permute: x_TD must be 2-D with unit stride in D, "
            f"got shape {tuple(x_TD.shape)} strides {x_TD.stride()}"
        )
    if idx_TK.dim() != 2 or idx_TK.shape[0] != x_TD.shape[0] or idx_TK.dtype != torch.int64:
        raise ValueError(
            f"moe_permute: idx_TK must be int64 [T={x_TD.shape[0]}, K], "
            f"got {idx_TK.dtype} {tuple(idx_TK.shape)}"
        )
    if counts_E.dim() != 1 or counts_E.dtype != torch.int64:
        raise ValueError(
            f"moe_permute: counts_E must be a 1-D int64 tensor, got {counts_E.dtype} {tuple(counts_E.shape)}"
        )
    if not isinstance(pad_multiple, int) or pad_multiple < 1:
        raise ValueError(f"moe_permute: pad_multiple must be an int >= 1, got {pad_multiple!r}")
    if len({x_TD.device, idx_TK.device, counts_E.device}) != 1:
        raise ValueError(
            f"moe_permute: x_TD, idx_TK, counts_E on different devices "
            f"({x_TD.device}, {idx_TK.device}, {counts_E.device})"
        )


# Forward and backward of both ops are torch custom ops: torch.compile sees each as one opaque node (no graph
# break at the Triton launches, which dynamo cannot trace under the CPU interpreter), and inductor fuses
# around them. Outputs are contiguous, as the fake (shape-only) versions promise.


@torch.library.custom_op("r1core::moe_permute_fwd", mutates_args=())
def _permute_op(
    x_TD: torch.Tensor, idx_TK: torch.Tensor, counts_E: torch.Tensor, pad_multiple: int
) -> tuple[torch.Tensor, torch.Tensor]:
    T, K = idx_TK.shape
    pos_TK = _positions(idx_TK.contiguous(), counts_E.contiguous(), pad_multiple)
    P = permuted_rows(T, K, counts_E.numel(), pad_multiple)
    x_PD, _ = _scatter(x_TD, pos_TK, None, P, x_TD.dtype)
    return x_PD, pos_TK


@_permute_op.register_fake
def _(x_TD, idx_TK, counts_E, pad_multiple):
    T, K = idx_TK.shape
    P = permuted_rows(T, K, counts_E.shape[0], pad_multiple)
    return x_TD.new_empty(P, x_TD.shape[1]), idx_TK.new_empty(T, K, dtype=torch.int64)


@torch.library.custom_op("r1core::moe_permute_bwd", mutates_args=())
def _permute_bwd_op(grad_x_PD: torch.Tensor, pos_TK: torch.Tensor) -> torch.Tensor:
    """grad_x[t] = sum_k grad_x_PD[pos[t, k]]."""
    return _gather(grad_x_PD.contiguous(), pos_TK, None, grad_x_PD.dtype)


@_permute_bwd_op.register_fake
def _(grad_x_PD, pos_TK):
    return grad_x_PD.new_empty(pos_TK.shape[0], grad_x_PD.shape[1])


def _permute_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.x_dtype = inputs[0].dtype


def _permute_backward(ctx, grad_x_PD, _grad_pos):
    (pos_TK,) = ctx.saved_tensors
    return _permute_bwd_op(grad_x_PD.to(ctx.x_dtype), pos_TK), None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup_context)


@torch.library.custom_op("r1core::moe_unpermute_fwd", mutates_args=())
def _unpermute_op(y_PD: torch.Tensor, pos_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    return _gather(y_PD, pos_TK, w_TK, y_PD.dtype)


@_unpermute_op.register_fake
def _(y_PD, pos_TK, w_TK):
    return y_PD.new_empty(pos_TK.shape[0], y_PD.shape[1])


@torch.library.custom_op("r1core::moe_unpermute_bwd", mutates_args=())
def _unpermute_bwd_op(
    grad_y_TD: torch.Tensor, y_PD: torch.Tensor, pos_TK: torch.Tensor, w_TK: torch.Tensor, need_w: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad y_PD, grad w_TK fp32); the latter empty when not `need_w` (custom ops return no None)."""
    grad_y_TD = grad_y_TD if grad_y_TD.stride(-1) == 1 else grad_y_TD.contiguous()
    grad_y_PD, dots = _scatter(
        grad_y_TD, pos_TK, w_TK, y_PD.shape[0], y_PD.dtype, y_PD=y_PD if need_w else None
    )
    return grad_y_PD, dots if need_w else w_TK.new_empty(0)


@_unpermute_bwd_op.register_fake
def _(grad_y_TD, y_PD, pos_TK, w_TK, need_w):
    return torch.empty_like(y_PD), (w_TK.new_empty(pos_TK.shape) if need_w else w_TK.new_empty(0))


def _unpermute_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _unpermute_backward(ctx, grad_y_TD):
    y_PD, pos_TK, w_TK = ctx.saved_tensors
    need_y, _, need_w = ctx.needs_input_grad
    grad_y_PD, grad_w = _unpermute_bwd_op(grad_y_TD, y_PD, pos_TK, w_TK, bool(need_w))
    return (grad_y_PD if need_y else None), None, (grad_w if need_w else None)


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup_context)


def moe_permute(x_TD: torch.Tensor, idx_TK: torch.Tensor, counts_E: torch.Tensor, pad_multiple: int = 1):
    """`permute_ref`'s contract: (x_PD [P, D] expert-contiguous, zero padding; pos_TK int64). No host sync."""
    _check_permute(x_TD, idx_TK, counts_E, pad_multiple)
    return _permute_op(x_TD, idx_TK, counts_E, pad_multiple)


def moe_unpermute(y_PD: torch.Tensor, pos_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """`unpermute_ref`'s contract: y_TD[t] = sum_k w[t,k] * y_PD[pos[t,k]] (fp32 accumulation, y's dtype)."""
    if y_PD.dim() != 2 or pos_TK.dim() != 2 or pos_TK.dtype != torch.int64:
        raise ValueError(
            f"moe_unpermute: need y_PD [P, D] and int64 pos_TK [T, K], got {tuple(y_PD.shape)}, "
            f"{pos_TK.dtype} {tuple(pos_TK.shape)}"
        )
    if weights_TK.shape != pos_TK.shape:
        raise ValueError(
            f"moe_unpermute: weights_TK {tuple(weights_TK.shape)} != pos_TK {tuple(pos_TK.shape)}"
        )
    if y_PD.shape[0] < pos_TK.numel():
        raise ValueError(f"moe_unpermute: y_PD has {y_PD.shape[0]} rows < T*K = {pos_TK.numel()}")
    # fp32 weights into the op; autograd casts grad w back to the weights' dtype
    return _unpermute_op(y_PD.contiguous(), pos_TK.contiguous(), weights_TK.float().contiguous())
