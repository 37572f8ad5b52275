"""Absorbed MLA attention for one decode token per row, reading each row's latent cache once.

Legend: B rows, H heads, S key slots, C latent rank (kv_lora_rank), R rope dim. With `wkv_b` absorbed into the
query (q_lat = q_nope W_UK) and the output (out = out_lat W_UV), MLA's decode attention runs on the latent
cache itself (DeepSeek-V2 §2.1.3; FlashMLA does the same):

    scores[b, h, s] = (q_lat[b, h] . kv[b, s] + q_pe[b, h] . pe[b, s]) * scale      for s < n_keys[b]
    out_lat[b, h]   = softmax_s(scores[b, h]) @ kv[b]

In PyTorch that is two batched GEMMs over the cache (scores, then probs @ kv), so the cache is read twice,
plus a softmax between them. The kernel reads a block of BLOCK_S slots of kv and pe once, uses it for the
scores of all heads and, with an online softmax (Milakov & Gimelshein 2018), for their weighted sum: one
launch per layer. One program per (row, block of heads); heads share the row's cache, so a block of 16 heads
reads it once (DeepSeek-V3's 128 heads read it 8 times, from L2 mostly).

`mla_decode` is a torch custom op (one opaque node under torch.compile, captured in CUDA graphs like any
kernel); `mla_decode_ref` is the specification in PyTorch (fp32 math).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["mla_decode", "mla_decode_ref"]


def mla_decode_ref(q_lat, q_pe, kv, pe, n_keys, scale: float) -> torch.Tensor:
    """[B, H, C] in q_lat's dtype; scores, softmax and the weighted sum in fp32."""
    S = kv.shape[1]
    scores = torch.einsum("bhc,bsc->bhs", q_lat.float(), kv.float())
    scores = (scores + torch.einsum("bhr,bsr->bhs", q_pe.float(), pe.float())) * scale
    valid = torch.arange(S, device=kv.device)[None, :] < n_keys[:, None]  # [B, S]
    probs = scores.masked_fill(~valid[:, None, :], float("-inf")).softmax(-1)
    return torch.einsum("bhs,bsc->bhc", probs, kv.float()).to(q_lat.dtype)


@triton.jit
def _mla_decode_kernel(
    q_ptr,
    qpe_ptr,
    kv_ptr,
    pe_ptr,
    n_ptr,
    out_ptr,
    H,
    S,
    C,
    R,
    stride_qb,
    stride_qh,
    stride_qpb,
    stride_qph,
    stride_kvb,
    stride_kvs,
    stride_peb,
    stride_pes,
    stride_ob,
    stride_oh,
    scale,
    BLOCK_H: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PREC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    c = tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    h_ok, c_ok, r_ok = h < H, c < C, r < R
    q = tl.load(
        q_ptr + b * stride_qb + h[:, None] * stride_qh + c[None, :], mask=h_ok[:, None] & c_ok[None, :]
    )
    qp = tl.load(
        qpe_ptr + b * stride_qpb + h[:, None] * stride_qph + r[None, :], mask=h_ok[:, None] & r_ok[None, :]
    )
    dt = kv_ptr.dtype.element_ty
    q, qp = q.to(dt), qp.to(dt)
    n = tl.minimum(tl.load(n_ptr + b), S)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_C), tl.float32)
    for s0 in range(0, n, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < n
        k = tl.load(
            kv_ptr + b * stride_kvb + s[:, None] * stride_kvs + c[None, :],
            mask=s_ok[:, None] & c_ok[None, :],
            other=0.0,
        )
        kp = tl.load(
            pe_ptr + b * stride_peb + s[:, None] * stride_pes + r[None, :],
            mask=s_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        qk = tl.dot(qp, tl.trans(kp), qk, input_precision=PREC)
        qk = tl.where(s_ok[None, :], qk * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(dt), k, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + b * stride_ob + h[:, None] * stride_oh + c[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=h_ok[:, None] & c_ok[None, :],
    )


# needs_fixed_stride_order: inductor passes the inputs in the strides eager tracing saw (it may otherwise
# lay out q_lat heads-first while the graph's assertions expect the traced strides)
@torch.library.custom_op("r1core::mla_decode", mutates_args=(), tags=(torch.Tag.needs_fixed_stride_order,))
def _mla_decode_op(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    pe: torch.Tensor,
    n_keys: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    B, H, C = q_lat.shape
    S, R = kv.shape[1], pe.shape[2]
    out = torch.empty(B, H, C, device=q_lat.device, dtype=q_lat.dtype)
    if B == 0:
        return out
    block_h = 16  # tl.dot's smallest M; the small preset's heads
    interp = not q_lat.is_cuda
    block_s = 16 if interp else 32
    _mla_decode_kernel[(B, triton.cdiv(H, block_h))](
        q_lat,
        q_pe,
        kv,
        pe,
        n_keys,
        out,
        H,
        S,
        C,
        R,
        q_lat.stride(0),
        q_lat.stride(1),
        q_pe.stride(0),
        q_pe.stride(1),
        kv.stride(0),
        kv.stride(1),
        pe.stride(0),
        pe.stride(1),
        out.stride(0),
        out.stride(1),
        scale,
        BLOCK_H=block_h,
        BLOCK_S=block_s,
        BLOCK_C=max(16, triton.next_power_of_2(C)),
        BLOCK_R=max(16, triton.next_power_of_2(R)),
        PREC="ieee" if kv.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=2,
    )
    return out


@_mla_decode_op.register_fake
def _(q_lat, q_pe, kv, pe, n_keys, scale):
    return q_lat.new_empty(q_lat.shape)  # contiguous, as the op allocates it (not q_lat's strides)


def mla_decode(q_lat, q_pe, kv, pe, n_keys, scale: float) -> torch.Tensor:
    """`mla_decode_ref`'s contract: q_lat [B, H, C], q_pe [B, H, R], kv [B, S, C], pe [B, S, R] (any row and
    slot strides, unit stride along C and R), n_keys [B] (int: slots [0, n_keys) are attended; at least 1),
    returns out_lat [B, H, C]. Inference only (no backward). On the CPU the kernel runs under the Triton
    interpreter, in fp32 only (the interpreter's tl.dot cannot multiply bf16)."""
    if q_lat.dim() != 3 or kv.dim() != 3 or q_pe.shape[:2] != q_lat.shape[:2] or pe.shape[:2] != kv.shape[:2]:
        raise ValueError(
            f"mla_decode: need q_lat [B, H, C], q_pe [B, H, R], kv [B, S, C], pe [B, S, R]; got "
            f"{tuple(q_lat.shape)}, {tuple(q_pe.shape)}, {tuple(kv.shape)}, {tuple(pe.shape)}"
        )
    if kv.shape[0] != q_lat.shape[0] or kv.shape[2] != q_lat.shape[2] or pe.shape[2] != q_pe.shape[2]:
        raise ValueError(
            f"mla_decode: shapes disagree: q_lat {tuple(q_lat.shape)}, kv {tuple(kv.shape)}, "
            f"q_pe {tuple(q_pe.shape)}, pe {tuple(pe.shape)}"
        )
    if any(t.stride(-1) != 1 for t in (q_lat, q_pe, kv, pe)):
        raise ValueError("mla_decode: the last dim of q_lat, q_pe, kv and pe must have unit stride")
    if not q_lat.is_cuda and kv.dtype != torch.float32:
        raise ValueError("mla_decode: on the CPU (Triton interpreter) only fp32 is supported")
    return _mla_decode_op(q_lat.contiguous(), q_pe.contiguous(), kv, pe, n_keys, float(scale))
