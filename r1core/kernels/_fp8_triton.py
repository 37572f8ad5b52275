"""Triton FP8 blockwise GEMMs for r1core.kernels.fp8 (formulas and scale layouts: see fp8.py's docstring).

`_fp8_gemm_kernel` is DeepSeek-V3 inference/kernel.py's `fp8_gemm_kernel` (fp32 accumulation of each
128-wide K slice, rescaled by the two tiles' scales before it is added), generalized to b scales in
1×128 rows or 128×128 blocks and to grouped experts (one weight per 128-row M tile).
`_fp8_wgrad_kernel` computes dw[e] = dyᵀ x over expert e's rows, in 128-row reduction chunks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 128


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    c_ptr,
    tile_e_ptr,
    M,
    N,
    K,
    stride_be,
    stride_bse,
    B_ROWS: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    nk = K // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    run = True
    if GROUPED:  # the M tile's expert picks the weight; -1: rows past the last segment, left zero
        e = tl.load(tile_e_ptr + pid_m)
        run = e >= 0
        e = tl.maximum(e, 0).to(tl.int64)
        b_ptr += e * stride_be
        bs_ptr += e * stride_bse
    if run:
        m_ok = offs_m < M
        n_ok = offs_n < N
        a_rows = a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
        b_rows = b_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
        for i in range(nk):
            a = tl.load(a_rows + i * BLOCK_K, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_rows + i * BLOCK_K, mask=n_ok[:, None], other=0.0)
            sa = tl.load(as_ptr + offs_m * nk + i, mask=m_ok, other=0.0)
            if B_ROWS:
                sb = tl.load(bs_ptr + offs_n * nk + i, mask=n_ok, other=0.0)
            else:
                sb = tl.load(bs_ptr + (offs_n // BLOCK_K) * nk + i, mask=n_ok, other=0.0)
            acc += tl.dot(a, tl.trans(b), out_dtype=tl.float32) * sa[:, None] * sb[None, :]
    c = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _check(a_q, a_s, b_q, b_s):
    assert a_q.dtype == b_q.dtype == torch.float8_e4m3fn, "fp8 GEMM: operands must be e4m3"
    assert a_q.is_contiguous() and b_q.is_contiguous(), "fp8 GEMM: operands must be row-major (K-last)"
    assert a_s.is_contiguous() and b_s.is_contiguous(), "fp8 GEMM: scales must be contiguous"
    assert a_q.shape[-1] % BLOCK == 0, f"fp8 GEMM: K={a_q.shape[-1]} must be a multiple of {BLOCK}"


def fp8_gemm_triton(a_q, a_s, b_q, b_s, out_dtype=torch.bfloat16, block_m: int = 128, block_n: int = 128):
    """dequant(a) [M, K] · dequant(b)ᵀ; b_s [N, K/128] (1×128 rows) or [N/128, K/128] (128×128 blocks)."""
    _check(a_q, a_s, b_q, b_s)
    M, K = a_q.shape
    N = b_q.shape[0]
    c = torch.empty(M, N, dtype=out_dtype, device=a_q.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _fp8_gemm_kernel[grid](
        a_q,
        a_s,
        b_q,
        b_s,
        c,
        a_s,
        M,
        N,
        K,
        0,
        0,
        B_ROWS=b_s.shape[0] == N,
        GROUPED=False,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=BLOCK,
        num_warps=8,
        num_stages=3,
    )
    return c


def grouped_fp8_gemm_triton(x_q, x_s, w_q, w_s, tile_e, out_dtype=torch.bfloat16):
    """y[rows of e] = dequant(x) · dequant(w[e])ᵀ; w [E, O, K] with 128×128 block scales [E, O/128, K/128]."""
    _check(x_q, x_s, w_q, w_s)
    P, K = x_q.shape
    E, n_out, _ = w_q.shape
    assert n_out % BLOCK == 0, f"grouped fp8 GEMM: out dim {n_out} must be a multiple of {BLOCK}"
    assert tile_e.numel() == triton.cdiv(P, BLOCK), "grouped fp8 GEMM: one expert per 128-row tile"
    y = torch.empty(P, n_out, dtype=out_dtype, device=x_q.device)
    grid = (triton.cdiv(P, BLOCK), triton.cdiv(n_out, BLOCK))
    _fp8_gemm_kernel[grid](
        x_q,
        x_s,
        w_q,
        w_s,
        y,
        tile_e,
        P,
        n_out,
        K,
        w_q.stride(0),
        w_s.stride(0),
        B_ROWS=False,
        GROUPED=True,
        BLOCK_M=BLOCK,
        BLOCK_N=BLOCK,
        BLOCK_K=BLOCK,
        num_warps=8,
        num_stages=3,
    )
    return y


@triton.jit
def _fp8_wgrad_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    c_ptr,
    seg_start_ptr,
    seg_len_ptr,
    N,
    K,
    P,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """c[e] [N, K] = Σ over e's rows p of a[:, p] b[:, p]ᵀ; a [N, P], b [K, P] 1×128-scaled along P."""
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_p = tl.arange(0, BLOCK_P)
    start = tl.load(seg_start_ptr + e)
    length = tl.load(seg_len_ptr + e)
    n_ok = offs_n < N
    k_ok = offs_k < K
    np_ = P // BLOCK_P
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for c in range(start // BLOCK_P, (start + length) // BLOCK_P):
        cols = c * BLOCK_P + offs_p[None, :]
        a = tl.load(a_ptr + offs_n[:, None].to(tl.int64) * P + cols, mask=n_ok[:, None], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None].to(tl.int64) * P + cols, mask=k_ok[:, None], other=0.0)
        sa = tl.load(as_ptr + offs_n * np_ + c, mask=n_ok, other=0.0)
        sb = tl.load(bs_ptr + offs_k * np_ + c, mask=k_ok, other=0.0)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.float32) * sa[:, None] * sb[None, :]
    out = c_ptr + e.to(tl.int64) * N * K + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    tl.store(out, acc, mask=n_ok[:, None] & k_ok[None, :])


def grouped_fp8_wgrad_triton(dyt_q, dyt_s, xt_q, xt_s, seg_E):
    """dw[e] = dequant(dyᵀ)[:, rows of e] · dequant(xᵀ)[:, rows of e]ᵀ in fp32; segments multiples of 128."""
    _check(dyt_q, dyt_s, xt_q, xt_s)
    N, P = dyt_q.shape
    K = xt_q.shape[0]
    E = seg_E.numel()
    seg_start = (torch.cumsum(seg_E, 0) - seg_E).to(torch.int32)
    dw = torch.empty(E, N, K, dtype=torch.float32, device=dyt_q.device)
    grid = (E, triton.cdiv(N, BLOCK), triton.cdiv(K, BLOCK))
    _fp8_wgrad_kernel[grid](
        dyt_q,
        dyt_s,
        xt_q,
        xt_s,
        dw,
        seg_start,
        seg_E.to(torch.int32),
        N,
        K,
        P,
        BLOCK_N=BLOCK,
        BLOCK_K=BLOCK,
        BLOCK_P=BLOCK,
        num_warps=8,
        num_stages=3,
    )
    return dw


# --------------------------------------------------------------------------- quantization
# One pass over a bf16 tensor writes every quantized copy its GEMMs need (DeepSeek-V3 report §3.3: the
# backward's 128x1 tiles are a transpose of the forward's 1x128 ones), instead of the reference's
# cast / abs / amax / divide / clamp / cast chain run once per orientation. The scale and the rounding
# are the reference's: s = max(amax, 1e-12) * fp32(1/448) (a product rounds alike on every device; torch's
# CUDA `amax / 448` is this product too, its CPU one a division), q = e4m3(clamp(x / s)) with an IEEE
# division (div_rn; Triton's `/` is an approximate one). Triton flushes fp32 subnormals in div_rn, which
# changes no e4m3 value: any x / s below 2^-126 rounds to e4m3 zero either way.
INV_448 = tl.constexpr(1 / 448)  # fp32 0x3B124925, fp8.FP8_INV_MAX


@triton.jit
def _e4m3_round(v):
    """clamp(v, ±448) rounded to nearest-even on the e4m3 grid, in fp32: the cast that follows is then exact
    on every backend (Triton's CPU interpreter rounds e4m3 casts wrongly: 125 -> 64, ties away from even)."""
    v = tl.clamp(v, -448.0, 448.0)
    av = tl.abs(v)
    e = tl.maximum(((av.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # e4m3 subnormals below 2^-6
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    inv_ulp = ((127 - e + 3) << 23).to(tl.float32, bitcast=True)  # powers of two: both products are exact
    r = ((av * inv_ulp + 8388608.0) - 8388608.0) * ulp  # fp32 addition rounds av / ulp (< 16) to nearest-even
    return tl.where(v < 0, -r, r)


@triton.jit
def _fp8_quant_dual_kernel(
    x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, K, Mp, stride_xm, TRANSPOSED: tl.constexpr, BLOCK: tl.constexpr
):
    """x [M, K] -> q [M, K], s [M, K/128] (1x128 tiles along K); with TRANSPOSED also
    qt [K, Mp], st [K, Mp/128] (128 tokens x 1 column tiles, stored K-major for wgrad; rows >= M are 0)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    m_ok = offs_m < M
    x = tl.load(
        x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=m_ok[:, None], other=0.0
    ).to(tl.float32)
    a = tl.abs(x)
    s_row = tl.maximum(tl.max(a, axis=1), 1e-12) * INV_448
    q = _e4m3_round(tl.math.div_rn(x, s_row[:, None]))
    tl.store(
        q_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :],
        q.to(q_ptr.dtype.element_ty),
        mask=m_ok[:, None],
    )
    tl.store(s_ptr + offs_m * (K // BLOCK) + pid_k, s_row, mask=m_ok)
    if TRANSPOSED:
        s_col = tl.maximum(tl.max(a, axis=0), 1e-12) * INV_448
        qt = _e4m3_round(tl.math.div_rn(x, s_col[None, :]))
        tl.store(qt_ptr + offs_k[None, :].to(tl.int64) * Mp + offs_m[:, None], qt.to(qt_ptr.dtype.element_ty))
        tl.store(st_ptr + offs_k * (Mp // BLOCK) + pid_m, s_col)


def quantize_dual_triton(x: torch.Tensor, transposed: bool = True):
    """(q, s): 1x128 tiles along K; with `transposed` also (qt, st): 128x1 tiles, zero-padded to 128 rows."""
    assert x.dim() == 2 and x.stride(1) == 1, "fp8 quantize: x must be 2-D with a contiguous last dim"
    M, K = x.shape
    assert K % BLOCK == 0, f"fp8 quantize: K={K} must be a multiple of {BLOCK}"
    Mp = triton.cdiv(M, BLOCK) * BLOCK
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, K // BLOCK, dtype=torch.float32, device=x.device)
    qt = torch.empty(K, Mp, dtype=torch.float8_e4m3fn, device=x.device) if transposed else q
    st = torch.empty(K, Mp // BLOCK, dtype=torch.float32, device=x.device) if transposed else s
    grid = (Mp // BLOCK, K // BLOCK)
    _fp8_quant_dual_kernel[grid](
        x, q, s, qt, st, M, K, Mp, x.stride(0), TRANSPOSED=transposed, BLOCK=BLOCK, num_warps=8
    )
    return (q, s, qt, st) if transposed else (q, s)


@triton.jit
def _fp8_quant_blocks_kernel(w_ptr, q_ptr, qt_ptr, s_ptr, N, K, BLOCK: tl.constexpr):
    """w [E, N, K] -> q [E, N, K], qt [E, K, N] (the transposed copy dgrad reads), s [E, N/128, K/128]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    e = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
    base = e * N * K
    w = tl.load(w_ptr + base + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]).to(tl.float32)
    s = tl.maximum(tl.max(tl.max(tl.abs(w), axis=1), axis=0), 1e-12) * INV_448
    q = _e4m3_round(tl.math.div_rn(w, s)).to(q_ptr.dtype.element_ty)
    tl.store(q_ptr + base + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], q)
    tl.store(qt_ptr + base + offs_k[None, :].to(tl.int64) * N + offs_n[:, None], q)
    tl.store(s_ptr + e * (N // BLOCK) * (K // BLOCK) + pid_n * (K // BLOCK) + pid_k, s)


def quantize_blocks_triton(w: torch.Tensor):
    """w [..., N, K] (contiguous) -> (q [..., N, K], s [..., N/128, K/128], qt [..., K, N]) in one pass."""
    assert w.is_contiguous(), "fp8 quantize: weights must be contiguous"
    *lead, N, K = w.shape
    assert N % BLOCK == 0 and K % BLOCK == 0, f"fp8 quantize: weight {N}x{K} must be in 128x128 blocks"
    E = w.numel() // (N * K)
    q = torch.empty_like(w, dtype=torch.float8_e4m3fn)
    qt = torch.empty(*lead, K, N, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty(*lead, N // BLOCK, K // BLOCK, dtype=torch.float32, device=w.device)
    _fp8_quant_blocks_kernel[(N // BLOCK, K // BLOCK, E)](w, q, qt, s, N, K, BLOCK=BLOCK, num_warps=8)
    return q, s, qt
