"""Inverse-CDF sampling over the vocabulary in one kernel: the rollout sampler's untruncated path.

For each row b, with p_v = exp(logp[b, v]) and the running sums c_v = p_0 + ... + p_v in fp64, the
sampled index is the number of v with c_v <= u_b * c_{V-1} (the first v whose c_v passes the target),
capped at V - 1: `inverse_cdf_ref`, which is what `r1core.rollout.sampling` computes with torch ops
(an fp64 copy of the probabilities, an fp64 cumsum, searchsorted). Zero-probability entries are never
picked: their c_v equals the one before.

The torch path writes and reads the [B, V] fp64 probabilities and their prefix sums (about 200 MB per
decode step at B 256, V 32768; its cumsum alone was 3.9 % of the compiled small-preset step on an H100,
benchmarks/RESULTS.md 11e). This kernel reads logp twice (a total pass, then a chunked scan carrying the
running sum) and writes one index per row. Sums are fp64 as in the reference, in another order, and the GPU's
fp32 exp may differ from torch's in the last bits, so an index can differ from the reference's only where the
target lies within that rounding of a c_v (about 1e-5 of the samples at V 32768 or fewer).

Legend: B rows, V vocabulary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _inverse_cdf_kernel(logp_ptr, u_ptr, out_ptr, V, stride_b, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logp_ptr + row * stride_b
    offs = tl.arange(0, BLOCK)
    lanes = tl.zeros([BLOCK], dtype=tl.float64)  # per-lane partial totals
    last = tl.full([BLOCK], -1, dtype=tl.int32)  # per lane, the last index of nonzero probability
    for start in range(0, V, BLOCK):
        m = start + offs < V
        p = tl.exp(tl.load(base + start + offs, mask=m, other=float("-inf")).to(tl.float32)).to(tl.float64)
        lanes += p
        last = tl.where(p > 0, start + offs, last)
    target = tl.load(u_ptr + row).to(tl.float64) * tl.sum(lanes, axis=0)
    running = tl.full((), 0.0, dtype=tl.float64)
    count = tl.full((), 0, dtype=tl.int32)
    for start in range(0, V, BLOCK):
        m = start + offs < V
        p = tl.exp(tl.load(base + start + offs, mask=m, other=float("-inf")).to(tl.float32)).to(tl.float64)
        c = tl.cumsum(p, axis=0) + running
        count += tl.sum(((c <= target) & m).to(tl.int32), axis=0)
        running += tl.sum(p, axis=0)
    # the scan's own total can round below the target (u within 1 ulp of 1): never step past the last entry
    # of nonzero probability
    last_nonzero = tl.max(last, axis=0)
    idx = tl.minimum(count, V - 1)
    idx = tl.where(last_nonzero >= 0, tl.minimum(idx, last_nonzero), idx)
    tl.store(out_ptr + row, idx.to(tl.int64))


def _block(V: int, on_gpu: bool) -> int:
    # one row per program: 2048-wide chunks (16 per row at V 32768) on the GPU; the interpreter runs each
    # chunk as numpy, so small chunks there keep odd V ragged in tests
    return min(2048 if on_gpu else 64, triton.next_power_of_2(max(V, 16)))


def _launch(logp_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    B, V = logp_BV.shape
    assert logp_BV.stride(1) == 1, "logp must be contiguous along the vocabulary"
    assert u_B.shape == (B,), f"u has shape {tuple(u_B.shape)}, want ({B},)"
    assert logp_BV.dtype in (torch.float32, torch.bfloat16, torch.float16), logp_BV.dtype
    out_B = torch.empty(B, dtype=torch.int64, device=logp_BV.device)
    if B:
        block = _block(V, logp_BV.is_cuda)
        _inverse_cdf_kernel[(B,)](
            logp_BV,
            u_B.double(),
            out_B,
            V,
            logp_BV.stride(0),
            BLOCK=block,
            num_warps=8 if block >= 1024 else 4,
        )
    return out_B


# A torch custom op, so a compiled decode step sees one opaque node (inductor fuses around it) and CUDA graphs
# capture the launch.
@torch.library.custom_op("r1core::inverse_cdf", mutates_args=())
def _inverse_cdf_op(logp_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    return _launch(logp_BV, u_B)


@_inverse_cdf_op.register_fake
def _(logp_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    return logp_BV.new_empty(logp_BV.shape[0], dtype=torch.int64)


def inverse_cdf(logp_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Sampled index per row of the distribution exp(logp) (unnormalized is fine) at uniforms u in [0, 1)."""
    return _inverse_cdf_op(logp_BV if logp_BV.stride(-1) == 1 else logp_BV.contiguous(), u_B)


def inverse_cdf_ref(logp_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    cdf_BV = logp_BV.float().exp().double().cumsum(-1)
    target_B1 = (u_B.double() * cdf_BV[:, -1])[:, None]
    return torch.searchsorted(cdf_BV, target_B1, right=True).clamp_(max=logp_BV.shape[-1] - 1)[:, 0]
