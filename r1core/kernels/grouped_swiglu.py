"""Grouped SwiGLU expert FFN over expert-contiguous row segments, forward and backward.

Legend: P permuted rows, D model dim, I expert hidden dim, E experts; segment e is rows
[start_e, start_e + seg_e) with start = exclusive_cumsum(seg); rows past the last segment are zero.
The gate and up weights come stacked, W13_e = [W1_e; W3_e] ([2I, D]; the model's w13 [E, 2, I, D]), and
so do their outputs, h13 = [h1 | h3] ([P, 2I]), and gradients:

    h13 = x W13_e^T,  a = silu(h1) * h3,  y = a W2_e^T                        (per segment e)
    backward (Shazeer 2020, "GLU Variants Improve Transformer", for the SwiGLU derivative):
    da = dy W2_e;  dh3 = da * silu(h1);  dh1 = da * h3 * sig(h1) * (1 + h1 (1 - sig(h1)))
    dx = dh13 W13_e (one GEMM over K = 2I: dh1 W1_e + dh3 W3_e);  dW13_e = dh13_e^T x_e;  dW2_e = dy_e^T a_e

Three implementations, chosen at run time by `grouped_swiglu_backend`:
  * "grouped_mm": `torch._grouped_mm` (CUTLASS sm90 grouped GEMM: 691 TFLOP/s forward at V3 expert
    shapes, 89% of dense) for the six GEMMs (2 forward, 4 backward), Triton for the SwiGLU steps. Used on
    Hopper when every operand is bf16, D and I are multiples of 8 (16-byte TMA strides) and E < 1024
    (the CUTLASS kernel's group limit). Its outputs are torch.empty, so rows past the last segment
    and the weight grads of experts with no rows are zeroed here.
  * "grouped_mm_tma": "grouped_mm" for the forward and the input gradients; the two weight-gradient GEMMs
    (K = an expert's rows, often a few hundred: CUTLASS's weakest, 59-66 % of the matmul peak at V3 shapes)
    run in r1core's persistent TMA kernel (`_wgrad_tma_kernel`: one program per SM walks the output tiles
    expert by expert; each tile's K loop is software-pipelined TMA loads into wgmma). Chosen by name only: the
    automatic choice on Hopper stays "grouped_mm" until this one is measured faster (benchmarks/moe_probe.py
    and bench_moe.py time both).
  * "triton": Triton grouped GEMMs with SwiGLU fused into the gate/up epilogue (forward) and into
    the epilogue of da (backward). Everything else: the CPU interpreter, fp32 / fp16, pre-Hopper GPUs.
h13 is saved for backward; a is recomputed there rather than kept.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1core.model.moe import grouped_swiglu_ref, grouped_swiglu_stacked_ref

__all__ = ["grouped_swiglu", "grouped_swiglu_ref", "grouped_swiglu_stacked_ref", "grouped_swiglu_backend"]

BACKENDS = ("grouped_mm", "grouped_mm_tma", "triton")


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _tile_rows(
    pid_m, tile_end_ptr, seg_start_ptr, seg_ptr, P, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr
):
    """Expert and rows of row-tile pid_m: tiles are numbered expert by expert
    (tile_end = cumsum cdiv(seg, BM))."""
    ar = tl.arange(0, BLOCK_E)
    ends = tl.load(tile_end_ptr + ar, mask=ar < E, other=2147483647)
    e = tl.sum((ends <= pid_m).to(tl.int32), axis=0)
    e_safe = tl.minimum(e, E - 1)
    first = tl.load(tile_end_ptr + e_safe - 1, mask=e_safe > 0, other=0)
    start = tl.load(seg_start_ptr + e_safe)
    rows = start + (pid_m - first) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = (rows < start + tl.load(seg_ptr + e_safe)) & (rows < P)
    return e, e_safe.to(tl.int64), rows.to(tl.int64), row_ok


@triton.jit
def _mma(
    acc,
    a_ptr,
    b_ptr,
    rows,
    row_ok,
    cols,
    col_ok,
    K,
    stride_am,
    stride_bk,
    stride_bn,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    """acc += A[rows, :K] @ B[:K, cols]; A has unit stride along K."""
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + rk[:, None] * stride_bk + cols[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + rk < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _swiglu_bwd_math(da, h1, h3):
    sig = tl.sigmoid(h1)
    silu = h1 * sig
    return da * h3 * sig * (1.0 + h1 * (1.0 - sig)), da * silu, silu * h3  # dh1, dh3, a


@triton.jit
def _gate_up_kernel(
    x_ptr,
    w1_ptr,
    w3_ptr,
    h1_ptr,
    h3_ptr,
    a_ptr,
    tile_end_ptr,
    seg_start_ptr,
    seg_ptr,
    P,
    D,
    I,
    E,
    stride_we,
    stride_wk,
    stride_wn,
    stride_hm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PREC: tl.constexpr,
):
    """h1 = x W1^T, h3 = x W3^T sharing each x tile (h1, h3 with row stride stride_hm: the halves of h13);
    epilogue a = silu(h1) * h3 from the rounded h1, h3."""
    n_tiles = tl.cdiv(I, BLOCK_N)
    pid_m = tl.program_id(0) // n_tiles
    e, e64, rows, row_ok = _tile_rows(pid_m, tile_end_ptr, seg_start_ptr, seg_ptr, P, E, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    cols = (tl.program_id(0) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * D + rk[None, :]
    w_off = e64 * stride_we + rk[:, None] * stride_wk + cols[None, :] * stride_wn
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = k0 + rk < D
        xa = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        acc1 = tl.dot(xa, tl.load(w1_ptr + w_off, mask=w_mask, other=0.0), acc1, input_precision=PREC)
        acc3 = tl.dot(xa, tl.load(w3_ptr + w_off, mask=w_mask, other=0.0), acc3, input_precision=PREC)
        x_ptrs += BLOCK_K
        w_off += BLOCK_K * stride_wk
    out_h = rows[:, None] * stride_hm + cols[None, :]
    out = rows[:, None] * I + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    h1 = acc1.to(h1_ptr.dtype.element_ty)
    h3 = acc3.to(h1_ptr.dtype.element_ty)
    tl.store(h1_ptr + out_h, h1, mask=mask)
    tl.store(h3_ptr + out_h, h3, mask=mask)
    h1f = h1.to(tl.float32)
    tl.store(a_ptr + out, (h1f * tl.sigmoid(h1f) * h3.to(tl.float32)).to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    h1_ptr,
    h3_ptr,
    dh3_ptr,
    act_ptr,
    tile_end_ptr,
    seg_start_ptr,
    seg_ptr,
    P,
    K,
    N,
    E,
    stride_be,
    stride_bk,
    stride_bn,
    stride_cm,
    SWIGLU_BWD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    PREC: tl.constexpr,
):
    """C[seg e] = A[seg e] @ B_e (C with row stride stride_cm). With SWIGLU_BWD, C is da and the epilogue
    writes dh1 to c_ptr, dh3 and the recomputed a (row stride N), reading the saved h1, h3 (h1, h3 and dh3
    with C's row stride: the halves of h13 and dh13)."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // n_tiles
    e, e64, rows, row_ok = _tile_rows(pid_m, tile_end_ptr, seg_start_ptr, seg_ptr, P, E, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    cols = (tl.program_id(0) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc = _mma(
        acc,
        a_ptr,
        b_ptr + e64 * stride_be,
        rows,
        row_ok,
        cols,
        col_ok,
        K,
        K,
        stride_bk,
        stride_bn,
        BLOCK_K,
        PREC,
    )
    out = rows[:, None] * stride_cm + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    dt = c_ptr.dtype.element_ty
    if SWIGLU_BWD:
        h1 = tl.load(h1_ptr + out, mask=mask, other=0.0).to(tl.float32)
        h3 = tl.load(h3_ptr + out, mask=mask, other=0.0).to(tl.float32)
        dh1, dh3, act = _swiglu_bwd_math(acc.to(dt).to(tl.float32), h1, h3)
        tl.store(dh3_ptr + out, dh3.to(dt), mask=mask)
        tl.store(act_ptr + rows[:, None] * N + cols[None, :], act.to(dt), mask=mask)
        tl.store(c_ptr + out, dh1.to(dt), mask=mask)
    else:
        tl.store(c_ptr + out, acc.to(dt), mask=mask)


@triton.jit
def _wgrad_rows(acc, a_ptr, b_ptr, start, lo, hi, rm, rn, M, N, STEP: tl.constexpr, PREC: tl.constexpr):
    """acc += A[start + lo : start + hi, rm]^T @ B[same rows, rn], STEP rows at a time, by masked loads
    (A: [P, M], B: [P, N], row-major)."""
    rk = tl.arange(0, STEP)
    for r0 in range(lo, hi, STEP):
        r = (start + r0 + rk).to(tl.int64)
        r_ok = r0 + rk < hi
        at = tl.load(a_ptr + r[None, :] * M + rm[:, None], mask=r_ok[None, :] & (rm < M)[:, None], other=0.0)
        b = tl.load(b_ptr + r[:, None] * N + rn[None, :], mask=r_ok[:, None] & (rn < N)[None, :], other=0.0)
        acc = tl.dot(at, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _wgrad_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    seg_start_ptr,
    seg_ptr,
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREC: tl.constexpr,
):
    """C_e[M, N] = A[seg e]^T @ B[seg e] (A: [P, M], B: [P, N], row-major); an empty segment gives zeros."""
    n_tiles = tl.cdiv(N, BLOCK_N)
    e = tl.program_id(1).to(tl.int64)
    rm = (tl.program_id(0) // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (tl.program_id(0) % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(seg_start_ptr + e).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc = _wgrad_rows(acc, a_ptr, b_ptr, start, 0, tl.load(seg_ptr + e), rm, rn, M, N, BLOCK_K, PREC)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    tl.store(c_ptr + e * M * N + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wgrad_tma_kernel(
    a_desc,
    b_desc,
    c_desc,
    a_ptr,
    b_ptr,
    seg_start_ptr,
    seg_ptr,
    E,
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_PROGS: tl.constexpr,
    PREC: tl.constexpr,
    TMA_TAIL: tl.constexpr = True,
):
    """_wgrad_kernel's C_e = A[seg e]^T @ B[seg e], persistent, through TMA descriptors.

    a_desc: A [P, M] in [BLOCK_K, BLOCK_M] blocks; b_desc: B [P, N] in [BLOCK_K, BLOCK_N]; c_desc: C [E, M, N]
    in [1, BLOCK_M, BLOCK_N]. NUM_PROGS programs (one per SM) walk the E * tiles(M) * tiles(N) output tiles,
    expert by expert, so an expert's rows of A and B stay in L2 while every program works on its tiles. A
    segment's whole BLOCK_K-row blocks come by TMA, software-pipelined. TMA cannot stop at a segment's end,
    so a last partial block is a whole TMA block from the partial block's first row, with A's rows past the
    segment's end (the next expert's, or zeros past A's end) zeroed in registers: one load, not masked
    gathers, which made the kernel 30 % slower under a Zipf load than under a uniform one (where no expert
    has a partial block; H100, RESULTS §10t). Rows of B there are not masked: a non-finite value in the
    next expert's rows of B would turn this expert's tile into NaN (0 * inf); B is an activation or an output
    gradient, finite wherever the step is. TMA_TAIL=False takes the partial block by masked loads in 16-row
    steps (benchmarks). A tile's TMA store runs on under the next tile's main loop. Stores clip at C's
    edges; empty segments store zeros.
    """
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_e = tl.cdiv(M, BLOCK_M) * tiles_n
    for t in range(tl.program_id(0), E * per_e, NUM_PROGS):
        e = t // per_e
        m0 = ((t % per_e) // tiles_n) * BLOCK_M
        n0 = (t % tiles_n) * BLOCK_N
        start = tl.load(seg_start_ptr + e)
        n_rows = tl.load(seg_ptr + e)
        n_full = (n_rows // BLOCK_K) * BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, n_full, BLOCK_K):
            a = a_desc.load([start + k0, m0])
            b = b_desc.load([start + k0, n0])
            acc = tl.dot(a.T, b, acc, input_precision=PREC)
        if TMA_TAIL:
            if n_rows > n_full:
                a = a_desc.load([start + n_full, m0])
                a = tl.where((tl.arange(0, BLOCK_K) < n_rows - n_full)[:, None], a, tl.zeros_like(a))
                acc = tl.dot(a.T, b_desc.load([start + n_full, n0]), acc, input_precision=PREC)
        else:  # masked loads in 16-row steps (a whole BLOCK_K-row block of A and B in registers raises the
            # kernel's register count to ptxas' limit, 255)
            rm = m0 + tl.arange(0, BLOCK_M)
            rn = n0 + tl.arange(0, BLOCK_N)
            acc = _wgrad_rows(acc, a_ptr, b_ptr, start, n_full, n_rows, rm, rn, M, N, 16, PREC)
        c_desc.store([e, m0, n0], acc.to(c_desc.dtype).reshape(1, BLOCK_M, BLOCK_N))


@triton.jit
def _swiglu_ew_kernel(
    h1_ptr,
    h3_ptr,
    da_ptr,
    a_ptr,
    dh1_ptr,
    dh3_ptr,
    used_ptr,
    N,
    stride_h,
    stride_a,
    BACKWARD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Elementwise SwiGLU for the grouped_mm path, over the rows of the segments only. h1, h3, dh1, dh3
    have row stride stride_h (the halves of h13, dh13); a and da have stride_a."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (r < tl.load(used_ptr))[:, None] & (c < N)[None, :]
    off = r.to(tl.int64)[:, None] * stride_h + c[None, :]
    off_a = r.to(tl.int64)[:, None] * stride_a + c[None, :]
    h1 = tl.load(h1_ptr + off, mask=mask, other=0.0).to(tl.float32)
    h3 = tl.load(h3_ptr + off, mask=mask, other=0.0).to(tl.float32)
    dt = a_ptr.dtype.element_ty
    if BACKWARD:
        dh1, dh3, act = _swiglu_bwd_math(tl.load(da_ptr + off_a, mask=mask, other=0.0).to(tl.float32), h1, h3)
        tl.store(dh1_ptr + off, dh1.to(dt), mask=mask)
        tl.store(dh3_ptr + off, dh3.to(dt), mask=mask)
    else:
        act = h1 * tl.sigmoid(h1) * h3
    tl.store(a_ptr + off_a, act.to(dt), mask=mask)


@triton.jit
def _zero_tail_kernel(out_ptr, used_ptr, P, N, stride_m, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    tail = (r >= tl.load(used_ptr)) & (r < P)
    if tl.sum(tail.to(tl.int32), axis=0) > 0:  # blocks inside the segments skip the N loop
        for n0 in range(0, N, BLOCK_N):
            c = n0 + tl.arange(0, BLOCK_N)
            zeros = tl.zeros((BLOCK_R, BLOCK_N), out_ptr.dtype.element_ty)
            tl.store(
                out_ptr + r.to(tl.int64)[:, None] * stride_m + c[None, :],
                zeros,
                mask=tail[:, None] & (c < N)[None, :],
            )


@triton.jit
def _zero_empty_experts_kernel(w_ptr, seg_ptr, numel, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(1).to(tl.int64)
    if tl.load(seg_ptr + e) == 0:
        for i0 in range(tl.program_id(0) * CHUNK, (tl.program_id(0) + 1) * CHUNK, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            tl.store(w_ptr + e * numel + i, tl.zeros((BLOCK,), w_ptr.dtype.element_ty), mask=i < numel)


# ----------------------------------------------------------------------------------------------- launchers
_INTERP_BLOCK_M = 16


def _configs(x: torch.Tensor) -> dict:
    """Tile shapes per kernel family. Row-tiled kernels share BLOCK_M (the tile table depends on it).

    prec: tl.dot input precision; "ieee" for fp32 operands, which tl.dot would otherwise round to tf32
    (it does not apply to bf16 / fp16 operands).
    """
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    if not x.is_cuda:  # interpreter: N and K tiles are fitted per call in _fit
        t = dict(BLOCK_M=_INTERP_BLOCK_M, BLOCK_N=128, BLOCK_K=128)
        return dict(
            gate_up=t,
            rows=t,
            swiglu_bwd=t,
            wgrad=dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=16),
            wgrad_tma=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16),
            prec=prec,
            fit=True,
        )
    if x.dtype == torch.float32:
        t = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)
        return dict(gate_up=t, rows=t, swiglu_bwd=t, wgrad=t, wgrad_tma=t, prec=prec, fit=False)
    # bf16 / fp16. Half the N tile where the epilogue holds two more fp32 tiles (gate_up's second
    # accumulator; h1, h3 in the SwiGLU backward): at 128 x 128 the latter spills 1.2 KB (ptxas, sm_90a).
    big = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    half = dict(big, BLOCK_N=64)
    # The persistent weight-gradient kernel: one 128 x 256 tile per SM, three 48 KB stages and the 64 KB
    # epilogue tile in shared memory (213 KB; ptxas, sm_90a: 174 registers).
    wgrad_tma = dict(big, BLOCK_N=256)
    return dict(gate_up=half, rows=big, swiglu_bwd=half, wgrad=big, wgrad_tma=wgrad_tma, prec=prec, fit=False)


def _fit(cfg: dict, family: str, M: int | None, N: int, K: int) -> dict:
    """The interpreter's tl.dot is an unblocked numpy loop: padded tile FLOPs are its cost, so shrink
    the tiles to the problem (never below 16, tl.dot's minimum)."""
    t = dict(cfg[family])
    if cfg["fit"]:

        def fit(b, n):
            return min(b, max(16, triton.next_power_of_2(n)))

        t["BLOCK_N"], t["BLOCK_K"] = fit(t["BLOCK_N"], N), fit(t["BLOCK_K"], K)
        if M is not None:
            t["BLOCK_M"] = fit(t["BLOCK_M"], M)
    return t


class _Segments:
    """Device-side segment tables (no host sync): int32 sizes, starts, row-tile ends and rows used."""

    def __init__(self, seg_E: torch.Tensor, block_m: int):
        self.seg = seg_E.to(torch.int32)
        ends = torch.cumsum(self.seg, 0, dtype=torch.int32)
        self.offs = ends  # torch._grouped_mm's group ends
        self.start = ends - self.seg
        self.tile_end = torch.cumsum((self.seg + block_m - 1) // block_m, 0, dtype=torch.int32)
        self.used = ends[-1:]


def _zero_tail(out: torch.Tensor, segs: _Segments) -> None:
    P, N = out.shape
    if P:
        _zero_tail_kernel[(triton.cdiv(P, 64),)](
            out, segs.used, P, N, out.stride(0), BLOCK_R=64, BLOCK_N=min(256, triton.next_power_of_2(N))
        )


def _rows_gemm(a, b, out, segs, cfg, b_strides, swiglu=None):
    """out[P, N] = a @ B_e per segment (see _rows_gemm_kernel); `out` may be a row-strided view (the
    first half of dh13); swiglu = (h1, h3, dh3, act) with h1, h3, dh3 at out's row stride."""
    P, K = a.shape
    N = out.shape[1]
    E = segs.seg.numel()
    t = _fit(cfg, "rows" if swiglu is None else "swiglu_bwd", None, N, K)
    grid = ((triton.cdiv(P, t["BLOCK_M"]) + E) * triton.cdiv(N, t["BLOCK_N"]),)
    h1, h3, dh3, act = swiglu if swiglu is not None else (out, out, out, out)
    _rows_gemm_kernel[grid](
        a,
        b,
        out,
        h1,
        h3,
        dh3,
        act,
        segs.tile_end,
        segs.start,
        segs.seg,
        P,
        K,
        N,
        E,
        *b_strides,
        out.stride(0),
        SWIGLU_BWD=swiglu is not None,
        BLOCK_E=triton.next_power_of_2(E),
        PREC=cfg["prec"],
        **t,
    )


def _wgrad(a, b, segs, cfg, dtype):
    """[E, M, N] = a[seg]^T @ b[seg] for every expert."""
    M, N = a.shape[1], b.shape[1]
    E = segs.seg.numel()
    out = torch.empty(E, M, N, device=a.device, dtype=dtype)
    t = _fit(cfg, "wgrad", M, N, 0)
    grid = (triton.cdiv(M, t["BLOCK_M"]) * triton.cdiv(N, t["BLOCK_N"]), E)
    _wgrad_kernel[grid](a, b, out, segs.start, segs.seg, M, N, PREC=cfg["prec"], **t)
    return out


def _wgrad_tma(a, b, segs, cfg, dtype, **tiles):
    """_wgrad through a persistent TMA kernel: [E, M, N] = a[seg]^T @ b[seg]; a [P, M] and b [P, N]
    contiguous. `tiles` overrides the config's tile shape, stages, warps, TMA_TAIL (see the kernel), or
    PER_SM, the programs per SM (benchmarks: two resident programs of a smaller tile let one's epilogue run
    beside the other's main loop)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, N = a.shape[1], b.shape[1]
    E = segs.seg.numel()
    out = torch.empty(E, M, N, device=a.device, dtype=dtype)
    t = _fit(cfg, "wgrad_tma", M, N, 0) | tiles
    bm, bn, bk = t["BLOCK_M"], t["BLOCK_N"], t["BLOCK_K"]
    per_sm = t.pop("PER_SM", 1)
    if "NUM_PROGS" not in t:
        sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 3
        t["NUM_PROGS"] = sms * per_sm
    _wgrad_tma_kernel[(t["NUM_PROGS"],)](
        TensorDescriptor.from_tensor(a, [bk, bm]),
        TensorDescriptor.from_tensor(b, [bk, bn]),
        TensorDescriptor.from_tensor(out, [1, bm, bn]),
        a,
        b,
        segs.start,
        segs.seg,
        E,
        M,
        N,
        PREC=cfg["prec"],
        **t,
    )
    return out


def _fwd_triton(x, w13, w2, segs, cfg):
    """w13: [E, 2I, D]; returns y [P, D] and h13 [P, 2I]."""
    P, D = x.shape
    E, I = w13.shape[0], w13.shape[1] // 2
    h13 = torch.empty(P, 2 * I, device=x.device, dtype=x.dtype)
    act = torch.empty(P, I, device=x.device, dtype=x.dtype)
    t = _fit(cfg, "gate_up", None, I, D)
    grid = ((triton.cdiv(P, t["BLOCK_M"]) + E) * triton.cdiv(I, t["BLOCK_N"]),)
    _gate_up_kernel[grid](
        x,
        w13[:, :I],
        w13[:, I:],
        h13[:, :I],
        h13[:, I:],
        act,
        segs.tile_end,
        segs.start,
        segs.seg,
        P,
        D,
        I,
        E,
        w13.stride(0),
        w13.stride(2),
        w13.stride(1),
        h13.stride(0),
        BLOCK_E=triton.next_power_of_2(E),
        PREC=cfg["prec"],
        **t,
    )
    y = torch.empty(P, D, device=x.device, dtype=x.dtype)
    # B_e[k=i, n=d] = W2_e[d, i]
    _rows_gemm(act, w2, y, segs, cfg, (w2.stride(0), w2.stride(2), w2.stride(1)))
    _zero_tail(y, segs)
    return y, h13


def _bwd_triton(dy, x, w13, w2, h13, segs, cfg, needs):
    P, D = x.shape
    I = w13.shape[1] // 2
    dh13 = torch.empty_like(h13)
    act = torch.empty(P, I, device=x.device, dtype=x.dtype)
    swiglu = (h13[:, :I], h13[:, I:], dh13[:, I:], act)
    _rows_gemm(dy, w2, dh13[:, :I], segs, cfg, (w2.stride(0), w2.stride(1), w2.stride(2)), swiglu=swiglu)
    dx = dw13 = dw2 = None
    if needs[0]:
        dx = torch.empty(P, D, device=x.device, dtype=x.dtype)
        _rows_gemm(dh13, w13, dx, segs, cfg, (w13.stride(0), w13.stride(1), w13.stride(2)))
        _zero_tail(dx, segs)
    if needs[1]:
        dw13 = _wgrad(dh13, x, segs, cfg, w13.dtype)
    if needs[2]:
        dw2 = _wgrad(dy, act, segs, cfg, w2.dtype)
    return dx, dw13, dw2


def _swiglu_ew(h13, segs, da=None):
    """(act, dh13): act = silu(h1) * h3 over h13 = [h1 | h3]; with da also dh13 = [dh1 | dh3], else None."""
    P, I = h13.shape[0], h13.shape[1] // 2
    act = torch.empty(P, I, device=h13.device, dtype=h13.dtype)
    dh13 = torch.empty_like(h13) if da is not None else None
    out = dh13 if dh13 is not None else h13  # not written without da
    if P:
        block_n = min(256, triton.next_power_of_2(I))
        _swiglu_ew_kernel[(triton.cdiv(P, 16), triton.cdiv(I, block_n))](
            h13[:, :I],
            h13[:, I:],
            da if da is not None else act,
            act,
            out[:, :I],
            out[:, I:],
            segs.used,
            I,
            h13.stride(0),
            I,
            BACKWARD=da is not None,
            BLOCK_R=16,
            BLOCK_N=block_n,
        )
    return act, dh13


def _zero_empty_experts(w_grad: torch.Tensor, segs: _Segments) -> None:
    # The CUTLASS kernel may leave a K=0 group's output unwritten (torch.empty storage).
    E = w_grad.shape[0]
    numel = w_grad[0].numel()
    chunk = max(8192, triton.next_power_of_2(triton.cdiv(numel, 32)))
    _zero_empty_experts_kernel[(triton.cdiv(numel, chunk), E)](
        w_grad, segs.seg, numel, CHUNK=chunk, BLOCK=4096
    )


def _fwd_grouped_mm(x, w13, w2, segs):
    gmm = torch._grouped_mm
    h13 = gmm(x, w13.transpose(-2, -1), offs=segs.offs)
    act, _ = _swiglu_ew(h13, segs)
    y = gmm(act, w2.transpose(-2, -1), offs=segs.offs)
    _zero_tail(y, segs)
    return y, h13


def _bwd_grouped_mm(dy, x, w13, w2, h13, segs, needs, cfg=None):
    """cfg None: CUTLASS for the weight gradients too; else _wgrad_tma with cfg's tiles."""
    gmm = torch._grouped_mm
    offs = segs.offs
    act, dh13 = _swiglu_ew(h13, segs, da=gmm(dy, w2, offs=offs))
    dx = None
    if needs[0]:
        dx = gmm(dh13, w13, offs=offs)  # dh1 W1 + dh3 W3 in one GEMM over K = 2I
        _zero_tail(dx, segs)

    def wgrad(a, b):  # K-grouped: [E, M, N] = a_e^T b_e
        if cfg is not None:
            return _wgrad_tma(a, b, segs, cfg, b.dtype)
        g = gmm(a.t(), b, offs=offs)
        _zero_empty_experts(g, segs)
        return g

    return dx, wgrad(dh13, x) if needs[1] else None, wgrad(dy, act) if needs[2] else None


# ----------------------------------------------------------------------------------------------- public API
def grouped_swiglu_backend(
    x_PD: torch.Tensor, w13_E2ID: torch.Tensor, w2_EDI: torch.Tensor | None = None
) -> str:
    """The implementation `grouped_swiglu` runs for these operands.

    "grouped_mm" on Hopper (sm90) when x and the weights are bf16 (its only fast path: other dtypes
    fall back to a per-group loop with a host sync), D and I are multiples of 8 (16-byte TMA
    strides), E < 1024 (CUTLASS group limit) and the data is 16-byte aligned; "triton" otherwise.
    """
    ops = [t for t in (x_PD, w13_E2ID, w2_EDI) if t is not None]
    if not (x_PD.is_cuda and hasattr(torch, "_grouped_mm")):
        return "triton"
    if any(t.dtype != torch.bfloat16 for t in ops) or torch.cuda.get_device_capability(x_PD.device)[0] != 9:
        return "triton"
    E, _, I, D = w13_E2ID.shape
    if D % 8 or I % 8 or E >= 1024 or any(t.data_ptr() % 16 for t in ops):
        return "triton"
    return "grouped_mm"


def _check(x, w13, w2, seg) -> None:
    if x.dim() != 2 or w13.dim() != 4 or w13.shape[1] != 2:
        raise ValueError(
            f"grouped_swiglu: need x_PD [P, D] and w13_E2ID [E, 2, I, D] (gate and up stacked), "
            f"got {tuple(x.shape)}, {tuple(w13.shape)}"
        )
    E, _, I, D = w13.shape
    if x.shape[1] != D or w2.shape != (E, D, I):
        raise ValueError(
            f"grouped_swiglu: shapes x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} "
            "do not match x [P, D], w13 [E, 2, I, D], w2 [E, D, I]"
        )
    if seg.shape != (E,) or seg.is_floating_point():
        raise ValueError(
            f"grouped_swiglu: seg_E must be an integer tensor of shape [{E}], "
            f"got {seg.dtype} {tuple(seg.shape)}"
        )
    if len({t.dtype for t in (x, w13, w2)}) != 1 or not x.is_floating_point():
        raise ValueError(
            f"grouped_swiglu: x and weights need one float dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}"
        )
    if len({t.device for t in (x, w13, w2, seg)}) != 1:
        raise ValueError("grouped_swiglu: x, weights and seg_E must be on one device")


# Forward and backward are torch custom ops: torch.compile sees each as one opaque node, so a compiled block
# stays one graph (dynamo cannot trace the backend choice, which reads data pointers, nor the Triton launches
# under the CPU interpreter), and the backend is chosen inside, on real tensors, at run time. The fake
# (shape-only) versions promise contiguous outputs, which every path returns. Inside, w13 is [E, 2I, D].


def _resolve(backend: str, x, w13, w2) -> str:
    return grouped_swiglu_backend(x, w13, w2) if backend == "auto" else backend


@torch.library.custom_op("r1core::grouped_swiglu_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, seg_E: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h13): the output and the gate / up projections [h1 | h3] backward reads."""
    cfg = _configs(x)
    segs = _Segments(seg_E, cfg["rows"]["BLOCK_M"])
    w13_flat = w13.flatten(1, 2)
    if _resolve(backend, x, w13, w2).startswith("grouped_mm"):
        y, h13 = _fwd_grouped_mm(x, w13_flat, w2, segs)
    else:
        y, h13 = _fwd_triton(x, w13_flat, w2, segs, cfg)
    return y.contiguous(), h13.contiguous()


@_fwd_op.register_fake
def _(x, w13, w2, seg_E, backend):
    return torch.empty_like(x), x.new_empty(x.shape[0], 2 * w13.shape[2])


@torch.library.custom_op("r1core::grouped_swiglu_bwd", mutates_args=())
def _bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    h13: torch.Tensor,
    seg_E: torch.Tensor,
    backend: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw13, dw2); a gradient not in `needs` comes back empty (custom ops return no None)."""
    cfg = _configs(x)
    segs = _Segments(seg_E, cfg["rows"]["BLOCK_M"])
    dy = dy.contiguous()
    w13_flat = w13.flatten(1, 2)
    resolved = _resolve(backend, x, w13, w2)
    if resolved.startswith("grouped_mm"):
        tma_cfg = cfg if resolved == "grouped_mm_tma" else None
        dx, dw13, dw2 = _bwd_grouped_mm(dy, x, w13_flat, w2, h13, segs, needs, tma_cfg)
    else:
        dx, dw13, dw2 = _bwd_triton(dy, x, w13_flat, w2, h13, segs, cfg, needs)
    dw13 = None if dw13 is None else dw13.reshape(w13.shape)
    return tuple(x.new_empty(0) if g is None else g.contiguous() for g in (dx, dw13, dw2))


@_bwd_op.register_fake
def _(dy, x, w13, w2, h13, seg_E, backend, needs):
    return tuple(torch.empty_like(t) if n else x.new_empty(0) for t, n in zip((x, w13, w2), needs))


def _setup_context(ctx, inputs, output):
    x, w13, w2, seg_E, backend = inputs
    ctx.save_for_backward(x, w13, w2, output[1], seg_E)
    ctx.backend = backend


def _backward(ctx, dy, _dh13):
    x, w13, w2, h13, seg_E = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:3]]
    grads = _bwd_op(dy, x, w13, w2, h13, seg_E, ctx.backend, needs)
    return (*(g if n else None for g, n in zip(grads, needs)), None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_swiglu(
    x_PD: torch.Tensor,
    w13_E2ID: torch.Tensor,
    w2_EDI: torch.Tensor,
    seg_E: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-segment SwiGLU FFN with `grouped_swiglu_stacked_ref`'s contract (gate and up stacked in w13
    [E, 2, I, D]); differentiable in x and the weights.

    `backend` None picks by `grouped_swiglu_backend` at run time (inside the custom op, so torch.compile
    never traces the choice); "grouped_mm" / "triton" force one (benchmarks).
    Precondition (not checked: it would need a host sync): sum(seg_E) <= P.
    """
    _check(x_PD, w13_E2ID, w2_EDI, seg_E)
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"grouped_swiglu: backend must be one of {BACKENDS} or None, got {backend!r}")
    if not x_PD.is_cuda and x_PD.dtype != torch.float32:
        # The interpreter's tl.dot multiplies bf16 / fp16 bit patterns as integers: run the CPU in
        # fp32 through differentiable casts (gradients come back in the callers' dtype).
        ops = (t.float() for t in (x_PD, w13_E2ID, w2_EDI))
        return grouped_swiglu(*ops, seg_E, backend).to(x_PD.dtype)
    if x_PD.shape[0] == 0 or seg_E.numel() == 0:
        return torch.zeros_like(x_PD)  # as the reference: nothing to compute, nothing to differentiate
    x_PD, w13_E2ID, w2_EDI = (t.contiguous() for t in (x_PD, w13_E2ID, w2_EDI))
    return _fwd_op(x_PD, w13_E2ID, w2_EDI, seg_E, backend or "auto")[0]
