"""Triton kernels behind r1core.kernels.grpo_loss (kernels/grpo_loss.py): log-sum-exp statistics
and d(loss)/d(logits).

All kernels work on z = scale * x (scale = 1 / temperature) and keep, per token, the online
log-sum-exp triple of Milakov & Gimelshein, "Online normalizer calculation for softmax" (2018):

    m = max_j z_j,   s = sum_j exp(z_j - m),   u = sum_j exp(z_j - m) * (z_j - m)

so lse = m + log s and the entropy H = lse - E_p[z] = log s - u / s. Keeping u relative to the
running max (rescaled as u' = a * (u + (m - m') * s), a = exp(m - m') when the max moves) avoids
the cancellation of lse - E_p[z] for peaked distributions with huge logits. Partial triples over
vocabulary slices (tiles, splits, tensor-parallel ranks) combine the same way (`combine_parts`).

The gradient of a loss L(logp_t) with c_t = dL/dlogp_t is, for every vocabulary entry j,

    dL/dx_tj = scale * c_t * (1[j = target_t] - exp(z_tj - lse_t))

Two families:
- row kernels (`row_stats`, `row_grad`) read a materialized logits chunk [C, V] produced by cuBLAS;
  one program per token sweeps the vocabulary twice (statistics, then gradient written in place).
- tiled kernels (`tiled_stats`, `tiled_grad`) compute logits tiles on the fly with tl.dot and never
  store them (the forward is 2NHV FLOPs; the backward recomputes them: 8NHV in all).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _row_stats_kernel(
    x_ptr, stride_x, tgt_ptr, m_ptr, s_ptr, u_ptr, zt_ptr, V, vocab_start, scale, BLOCK_V: tl.constexpr
):
    """One token: online (m, s, u) over the vocab tiles of its logits row, and its target's z."""
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride_x
    tgt = tl.load(tgt_ptr + row) - vocab_start
    in_shard = (tgt >= 0) & (tgt < V)
    zt = tl.load(base + tgt, mask=in_shard, other=0.0).to(tl.float32) * scale
    m = -1.0e30  # finite start: (m - m_new) * s must be 0, not -inf * 0, for an empty prefix
    s = 0.0
    u = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < V
        z = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32) * scale
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        d = tl.where(valid, z - m_new, 0.0)
        e = tl.where(valid, tl.exp(d), 0.0)
        u = alpha * (u + (m - m_new) * s) + tl.sum(e * d, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(u_ptr + row, u)
    tl.store(zt_ptr + row, zt)


@triton.jit
def _row_grad_kernel(
    x_ptr,
    stride_x,
    g_ptr,
    stride_g,
    tgt_ptr,
    lse_ptr,
    coef_ptr,
    V,
    vocab_start,
    scale,
    BLOCK_V: tl.constexpr,
    ALIASED_NARROW: tl.constexpr,
):
    """One token: g_j = coef * (1[j = target] - exp(scale * x_j - lse)), coef already holding the scale.

    g may alias x. Same dtype: each element is overwritten by the thread that read it. A narrower g
    inside the same row (bf16 gradient over fp32 logits, ALIASED_NARROW) only overwrites bytes of
    tiles already read, but other warps may still be reading them: the barrier orders that.
    """
    row = tl.program_id(0)
    x_base = x_ptr + row.to(tl.int64) * stride_x
    g_base = g_ptr + row.to(tl.int64) * stride_g
    tgt = tl.load(tgt_ptr + row) - vocab_start
    lse = tl.load(lse_ptr + row)
    coef = tl.load(coef_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < V
        z = tl.load(x_base + cols, mask=valid, other=0.0).to(tl.float32) * scale
        if ALIASED_NARROW:
            tl.debug_barrier()
        g = coef * (tl.where(cols == tgt, 1.0, 0.0) - tl.exp(z - lse))
        tl.store(g_base + cols, g.to(g_ptr.dtype.element_ty), mask=valid)


def _row_block(V: int, elem_bytes: int) -> tuple[int, int]:
    if not torch.cuda.is_available():
        return 64, 4  # interpreter: small tiles so odd V spans several tiles with a ragged last one
    block = min(triton.next_power_of_2(V), 8192 if elem_bytes <= 2 else 4096)
    return block, 16 if block >= 4096 else 8


def row_stats(x: torch.Tensor, targets: torch.Tensor, vocab_start: int, scale: float) -> torch.Tensor:
    """(m, s, u, z_target) fp32 [4, C] for logits rows x [C, V] (row stride free, unit column stride)."""
    C, V = x.shape
    assert x.stride(1) == 1 and targets.shape == (C,) and targets.is_contiguous(), "row_stats: bad layout"
    out = torch.empty(4, C, device=x.device, dtype=torch.float32)
    block, warps = _row_block(V, x.element_size())
    _row_stats_kernel[(C,)](
        x,
        x.stride(0),
        targets,
        out[0],
        out[1],
        out[2],
        out[3],
        V,
        vocab_start,
        scale,
        BLOCK_V=block,
        num_warps=warps,
    )
    return out


def row_grad(
    x: torch.Tensor,
    g: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    vocab_start: int,
    scale: float,
) -> None:
    """Write dL/dx into g [C, V] (may alias x, see the kernel); coef = scale * dL/dlogp, fp32 [C]."""
    C, V = x.shape
    assert g.shape == x.shape and x.stride(1) == 1 and g.stride(1) == 1, "row_grad: bad layout"
    assert lse.dtype == coef.dtype == torch.float32 and lse.is_contiguous() and coef.is_contiguous()
    narrow = g.data_ptr() == x.data_ptr() and g.element_size() != x.element_size()
    block, warps = _row_block(V, x.element_size())
    _row_grad_kernel[(C,)](
        x,
        x.stride(0),
        g,
        g.stride(0),
        targets,
        lse,
        coef,
        V,
        vocab_start,
        scale,
        BLOCK_V=block,
        ALIASED_NARROW=narrow,
        num_warps=warps,
    )


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    rows,
    cols,
    rmask,
    cmask,
    H,
    stride_h,
    stride_w,
    BM: tl.constexpr,
    BV: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """x[rows, cols] = h[rows] . w[cols]^T, fp32 accumulation over H in BK steps."""
    acc = tl.zeros((BM, BV), dtype=tl.float32)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < H
        a = tl.load(
            h_ptr + rows[:, None].to(tl.int64) * stride_h + ks[None, :],
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        )
        b = tl.load(
            w_ptr + cols[None, :].to(tl.int64) * stride_w + ks[:, None],
            mask=kmask[:, None] & cmask[None, :],
            other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _tiled_stats_kernel(
    h_ptr,
    w_ptr,
    tgt_ptr,
    part_ptr,
    N,
    V,
    H,
    stride_h,
    stride_w,
    vocab_start,
    scale,
    V_PER_SPLIT,
    BM: tl.constexpr,
    BV: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(m, s, u, z_target) of BM tokens over one vocabulary split, logits computed tile by tile."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1) - vocab_start
    v_lo = pid_s * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
    m = tl.zeros((BM,), dtype=tl.float32) - 1.0e30  # finite: see _row_stats_kernel
    s = tl.zeros((BM,), dtype=tl.float32)
    u = tl.zeros((BM,), dtype=tl.float32)
    zt = tl.zeros((BM,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BV):
        cols = v0 + tl.arange(0, BV)
        cmask = cols < v_hi
        x = _logits_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w, BM, BV, BK, PRECISION)
        z = tl.where(cmask[None, :], x * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        d = tl.where(cmask[None, :], z - m_new[:, None], 0.0)
        e = tl.where(cmask[None, :], tl.exp(d), 0.0)
        u = alpha * (u + (m - m_new) * s) + tl.sum(e * d, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        hit = (cols[None, :] == tgt[:, None]) & cmask[None, :]  # a target past v_hi is another split's
        zt += tl.sum(tl.where(hit, z, 0.0), axis=1)
    out = part_ptr + pid_s * 4 * N + rows
    tl.store(out, m, mask=rmask)
    tl.store(out + N, s, mask=rmask)
    tl.store(out + 2 * N, u, mask=rmask)
    tl.store(out + 3 * N, zt, mask=rmask)


@triton.jit
def _tiled_grad_kernel(
    h_ptr,
    w_ptr,
    tgt_ptr,
    lse_ptr,
    coef_ptr,
    gh_ptr,
    gw_ptr,
    N,
    V,
    H,
    stride_h,
    stride_w,
    vocab_start,
    scale,
    BM: tl.constexpr,
    BV: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One vocab tile owns gw[cols] (plain read-modify-write); gh rows are shared: atomic adds (fp32).

    Logits are recomputed from h and w; coef = scale * dL/dlogp (grad_output folded in).
    """
    pid_v = tl.program_id(0)
    cols = pid_v * BV + tl.arange(0, BV)
    cmask = cols < V
    for m0 in range(0, N, BM):
        rows = m0 + tl.arange(0, BM)
        rmask = rows < N
        x = _logits_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w, BM, BV, BK, PRECISION)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        coef = tl.load(coef_ptr + rows, mask=rmask, other=0.0)
        tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1) - vocab_start
        onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        g = coef[:, None] * (onehot - tl.exp(x * scale - lse[:, None]))
        g = tl.where(rmask[:, None] & cmask[None, :], g, 0.0).to(h_ptr.dtype.element_ty)
        for k0 in range(0, H, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks < H
            a = tl.load(
                h_ptr + rows[:, None].to(tl.int64) * stride_h + ks[None, :],
                mask=rmask[:, None] & kmask[None, :],
                other=0.0,
            )
            b = tl.load(
                w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :],
                mask=cmask[:, None] & kmask[None, :],
                other=0.0,
            )
            gh = tl.dot(g, b, input_precision=PRECISION)  # [BM, BK]
            tl.atomic_add(
                gh_ptr + rows[:, None].to(tl.int64) * H + ks[None, :],
                gh,
                mask=rmask[:, None] & kmask[None, :],
            )
            gw_ptrs = gw_ptr + cols[:, None].to(tl.int64) * H + ks[None, :]
            wmask = cmask[:, None] & kmask[None, :]
            gw = tl.load(gw_ptrs, mask=wmask, other=0.0)
            gw += tl.dot(tl.trans(g), a, input_precision=PRECISION)  # [BV, BK]
            tl.store(gw_ptrs, gw, mask=wmask)


def _tile_config(dtype: torch.dtype) -> dict:
    if not torch.cuda.is_available():
        # interpreter: 16 is tl.dot's smallest tile; small tiles keep odd H / V ragged
        return dict(BM=16, BV=32, BK=16, PRECISION="ieee")
    return dict(BM=64, BV=128, BK=64, PRECISION="ieee" if dtype == torch.float32 else "tf32", num_warps=8)


def tiled_stats(
    h: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    vocab_start: int,
    scale: float,
    splits: int | None = None,
) -> torch.Tensor:
    """Partial (m, s, u, z_target) [splits, 4, N] of h [N, H] against w [V, H], logits never stored."""
    N, H = h.shape
    V = w.shape[0]
    assert h.stride(1) == 1 and w.stride(1) == 1 and w.shape[1] == H and targets.is_contiguous()
    cfg = _tile_config(h.dtype)
    n_vt = triton.cdiv(V, cfg["BV"])
    if splits is None:  # enough programs to fill the GPU when N is small
        splits = (
            2 if not torch.cuda.is_available() else max(1, min(n_vt, 4 * 132 // triton.cdiv(N, cfg["BM"])))
        )
    per_split = triton.cdiv(n_vt, splits) * cfg["BV"]
    splits = triton.cdiv(V, per_split)
    parts = torch.empty(splits, 4, N, device=h.device, dtype=torch.float32)
    grid = (triton.cdiv(N, cfg["BM"]), splits)
    _tiled_stats_kernel[grid](
        h, w, targets, parts, N, V, H, h.stride(0), w.stride(0), vocab_start, scale, per_split, **cfg
    )
    return parts


def tiled_grad(
    h: torch.Tensor,
    w: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    coef: torch.Tensor,
    vocab_start: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_h, grad_w) in fp32, recomputing the logits; coef = scale * grad_output * dL/dlogp."""
    N, H = h.shape
    V = w.shape[0]
    gh = torch.zeros(N, H, device=h.device, dtype=torch.float32)
    gw = torch.zeros(V, H, device=h.device, dtype=torch.float32)
    cfg = _tile_config(h.dtype)
    _tiled_grad_kernel[(triton.cdiv(V, cfg["BV"]),)](
        h, w, targets, lse, coef, gh, gw, N, V, H, h.stride(0), w.stride(0), vocab_start, scale, **cfg
    )
    return gh, gw


def combine_parts(parts: torch.Tensor) -> torch.Tensor:
    """Merge partial (m, s, u, z_target) [P, 4, N] over disjoint vocabulary slices into [4, N]."""
    m, s, u, zt = parts.unbind(1)
    M = m.amax(dim=0)
    a = torch.exp(m - M)
    return torch.stack([M, (a * s).sum(0), (a * (u + (m - M) * s)).sum(0), zt.sum(0)])
