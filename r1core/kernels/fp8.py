"""FP8 training GEMMs with DeepSeek-V3's fine-grained scaling (DeepSeek-V3 report §3.3).

Every GEMM of a linear layer (forward y = x Wᵀ, dgrad dx = dy W, wgrad dW = dyᵀ x) runs on e4m3
operands with fp32 accumulation; its result is bf16 (or the caller's dtype). Scales are fp32 and
fine-grained, so one outlier spoils only its own tile:
  activations and output gradients   1×128 tiles along the GEMM's reduction dim ("rows" below);
                                      for wgrad the reduction runs over tokens, so dy and x are tiled
                                      128 tokens × 1 column (the report's 128×1 backward tiles)
  weights                             128×128 blocks (transposing a weight keeps its blocks, so dgrad
                                      reuses the forward's quantized weight)
Scale = amax / 448 (e4m3's largest value), as in DeepSeek-V3's `act_quant` / `weight_dequant`, computed
as amax · fp32(1/448): one correctly rounded product that torch on the CPU, torch on CUDA (whose division by
a Python scalar is exactly this multiplication) and the Triton kernels all round alike.
Master weights, gradients and the optimizer state stay in the model's dtype (bf16 or fp32 master).

One primitive carries all three GEMMs: `blockwise_gemm(a_q, a_s, b_q, b_s) = dequant(a) · dequant(b)ᵀ`
with both operands K-last (row-major, the reduction dim contiguous). `b_s` of shape [N/128, K/128]
means 128×128 blocks, [N, K/128] means 1×128 rows. Backends:
  torch   `torch.nn.functional.scaled_mm` (cuBLASLt blockwise, sm90 + CUDA ≥ 12.9): supports
          1×128·128×128 (forward, dgrad) and 1×128·1×128 (wgrad); it wants the scales outer-dim-major
          (scale_a [M, K/128] with strides (1, M); 128×128 scales [round_up(K/128, 4), N/128] with
          strides (1, that)) and K a multiple of 128. Probed once per device against the reference.
  triton  `_fp8_gemm_kernel` below (DeepSeek-V3 inference/kernel.py's `fp8_gemm`, generalized to
          both scale kinds and to grouped experts); used where torch's path is absent.
  ref     dequantize to fp32 and matmul (IEEE fp32, TF32 off): the numerical specification (CPU). Grouped
          experts run one GEMM per 128-row tile, so no row's result depends on how other tokens route.
Quantization: one Triton pass per tensor (`quantize_dual`: x's 1×128 tiles and its transposed 128-token
tiles; `quantize_blocks_t`: W and the transposed copy dgrad reads), bit-identical to the PyTorch reference.
A linear layer saves only xᵀ's fp8 tiles for wgrad. Its forward and backward are custom ops, so
torch.compile keeps the whole block one graph around them.
Grouped experts (`grouped_linear_fp8`) need segments padded to 128 rows, so each 128-row tile
belongs to one expert (forward/dgrad: one weight per M tile) and each wgrad reduction chunk
holds one expert's rows; torch has no blockwise grouped GEMM for sm90, so they always use Triton.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128
_TINY = 1e-12  # floor of amax: an all-zero tile gets a tiny scale instead of 0/0
FP8_INV_MAX = 1 / FP8_MAX  # rounds to fp32 0x3B124925 as the factor of a float32 product on every backend


# --------------------------------------------------------------------------- quantization (PyTorch: the
# reference; the training path uses quantize_dual / quantize_blocks_t, one Triton pass off "ref")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [..., K] e4m3, s [..., K/128] fp32), one scale per 1×128 tile of the last dim."""
    *lead, K = x.shape
    if K % BLOCK:
        raise ValueError(f"fp8 1x128 tiles need the last dim divisible by {BLOCK}, got {K}")
    xt = x.contiguous().float().reshape(*lead, K // BLOCK, BLOCK)  # row-major out, even for x.t()
    s = xt.abs().amax(-1).clamp(min=_TINY) * FP8_INV_MAX  # not `/ FP8_MAX`: see the module doc
    q = (xt / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(*lead, K), s


def dequantize_rows(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    *lead, K = q.shape
    return (q.float().reshape(*lead, K // BLOCK, BLOCK) * s[..., None]).reshape(*lead, K)


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (q e4m3, s [..., N/128, K/128] fp32), one scale per 128×128 block."""
    *lead, N, K = w.shape
    if N % BLOCK or K % BLOCK:
        raise ValueError(f"fp8 128x128 blocks need both weight dims divisible by {BLOCK}, got {N}x{K}")
    wb = w.float().reshape(*lead, N // BLOCK, BLOCK, K // BLOCK, BLOCK)
    s = wb.abs().amax(dim=(-3, -1)).clamp(min=_TINY) * FP8_INV_MAX
    q = (wb / s[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(*lead, N, K), s


def dequantize_blocks(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    *lead, N, K = q.shape
    wb = q.float().reshape(*lead, N // BLOCK, BLOCK, K // BLOCK, BLOCK) * s[..., :, None, :, None]
    return wb.reshape(*lead, N, K)


def _dequantize_b(b_q: torch.Tensor, b_s: torch.Tensor) -> torch.Tensor:
    return dequantize_rows(b_q, b_s) if _b_is_rows(b_q, b_s) else dequantize_blocks(b_q, b_s)


def _b_is_rows(b_q: torch.Tensor, b_s: torch.Tensor) -> bool:
    return b_s.shape[-2] == b_q.shape[-2]


def quantize_dual(x: torch.Tensor, impl: str = "ref"):
    """x [M, K] -> (q, s) of 1x128 tiles along K and (qt [K, Mp], st [K, Mp/128]) of 128-token x 1 tiles
    (zero rows pad M to Mp, a multiple of 128): what the forward / dgrad and the wgrad GEMMs read.
    Off "ref", one Triton pass reads x once and writes both (the same values: tests/test_fp8.py)."""
    if impl == "ref":
        return (*quantize_rows(x), *quantize_rows(_pad_rows(x).t()))
    from ._fp8_triton import quantize_dual_triton

    return quantize_dual_triton(x if x.stride(-1) == 1 else x.contiguous())


def quantize_blocks_t(w: torch.Tensor, impl: str = "ref"):
    """w [..., N, K] -> (q, s [..., N/128, K/128], qt [..., K, N]): the transposed copy is dgrad's K-last
    operand (a 128x128 block transposes onto a block, so s serves both, transposed)."""
    if impl == "ref":
        q, s = quantize_blocks(w)
        return q, s, q.transpose(-1, -2).contiguous()
    from ._fp8_triton import quantize_blocks_triton

    return quantize_blocks_triton(w.contiguous())


# --------------------------------------------------------------------------- the GEMM primitive


@contextlib.contextmanager
def _ieee_fp32(device: torch.device):
    """fp32 matmuls in full fp32 for the reference, even where the caller allows TF32 (whose 10-bit
    mantissa would round the dequantized operands: e4m3's 4 significant bits times a 24-bit scale).

    Through the per-backend setting of torch >= 2.9 (`torch.backends.cuda.matmul.fp32_precision`, "none"
    inheriting `torch.backends.fp32_precision`), which reads and restores safely whichever API the caller
    used; torch's legacy getters raise once both APIs have been used, so they are never read here.
    """
    flags = torch.backends.cuda.matmul if device.type == "cuda" else torch.backends.mkldnn.matmul
    prev = getattr(flags, "fp32_precision", None)
    effective = torch.backends.fp32_precision if prev == "none" else prev
    if prev is None or effective in ("ieee", "none"):  # the default (torch < 2.9: left as it is)
        yield
        return
    flags.fp32_precision = "ieee"
    try:
        yield
    finally:
        flags.fp32_precision = prev


def blockwise_gemm_ref(a_q, a_s, b_q, b_s, out_dtype=torch.bfloat16) -> torch.Tensor:
    """dequant(a) [M, K] · dequant(b)ᵀ [K, N] in fp32: what every backend must reproduce."""
    with _ieee_fp32(a_q.device):
        return (dequantize_rows(a_q, a_s) @ _dequantize_b(b_q, b_s).T).to(out_dtype)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _outer_major(s: torch.Tensor) -> torch.Tensor:
    """The same [R, C] values with strides (1, R): the scale layout cuBLASLt's blockwise GEMM reads."""
    return s.t().contiguous().t()


def _torch_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.bfloat16) -> torch.Tensor:
    from torch.nn.functional import ScalingType

    if _b_is_rows(b_q, b_s):
        recipe_b, scale_b = ScalingType.BlockWise1x128, _outer_major(b_s)
    else:  # [N/128, K/128] -> [round_up(K/128, 4), N/128], strides (1, round_up(K/128, 4))
        recipe_b = ScalingType.BlockWise128x128
        scale_b = F.pad(b_s, (0, _round_up(b_s.shape[1], 4) - b_s.shape[1])).t()
    return F.scaled_mm(
        a_q, b_q.t(), _outer_major(a_s), ScalingType.BlockWise1x128, scale_b, recipe_b, output_dtype=out_dtype
    )


@functools.cache
def torch_blockwise_supported(device_index: int, b_rows: bool) -> bool:
    """Whether torch's scaled_mm runs this scaling pair on the device and matches the reference."""
    if not hasattr(F, "scaled_mm"):
        return False
    dev = torch.device("cuda", device_index)
    g = torch.Generator(device=dev).manual_seed(0)
    a_q, a_s = quantize_rows(torch.randn(256, 384, device=dev, generator=g))
    b = torch.randn(256, 384, device=dev, generator=g)
    b_q, b_s = quantize_rows(b) if b_rows else quantize_blocks(b)
    try:
        out = _torch_gemm(a_q, a_s, b_q, b_s, torch.float32)
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return False
    ref = blockwise_gemm_ref(a_q, a_s, b_q, b_s, torch.float32)
    return bool(((out - ref).abs().max() <= 1e-3 * ref.abs().max()).item())


def backend(device: torch.device, b_rows: bool) -> str:
    forced = os.environ.get("R1CORE_FP8_BACKEND")  # torch | triton | ref: tests and benchmarks pin one
    if forced:
        return forced
    if device.type != "cuda":
        return "ref"
    return "torch" if torch_blockwise_supported(device.index or 0, b_rows) else "triton"


def blockwise_gemm(a_q, a_s, b_q, b_s, out_dtype=torch.bfloat16, impl: str | None = None) -> torch.Tensor:
    """dequant(a) · dequant(b)ᵀ with fp32 accumulation; a [M, K] 1×128 scales, b [N, K] (see module doc)."""
    M, K = a_q.shape
    if b_q.shape[1] != K or a_s.shape != (M, K // BLOCK):
        raise ValueError(
            f"blockwise_gemm: a {tuple(a_q.shape)}, its scales {tuple(a_s.shape)}, "
            f"b {tuple(b_q.shape)}: K or the 1x128 scale shape disagree"
        )
    impl = impl or backend(a_q.device, _b_is_rows(b_q, b_s))
    b_rows = _b_is_rows(b_q, b_s)
    if impl == "torch" and a_q.is_cuda and not torch_blockwise_supported(a_q.device.index or 0, b_rows):
        impl = "triton"  # e.g. a torch whose scaled_mm has 1x128 x 128x128 but not wgrad's 1x128 x 1x128
    if impl == "ref":
        return blockwise_gemm_ref(a_q, a_s, b_q, b_s, out_dtype)
    if impl == "torch":
        return _torch_gemm(a_q, a_s, b_q, b_s, out_dtype)
    from ._fp8_triton import fp8_gemm_triton

    return fp8_gemm_triton(a_q, a_s, b_q, b_s, out_dtype)


# --------------------------------------------------------------------------- linear layers


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    """Zero rows up to a multiple of 128: wgrad reduces over rows in 128-row tiles (zeros add nothing)."""
    pad = _round_up(x.shape[0], BLOCK) - x.shape[0]
    return F.pad(x, (0, 0, 0, pad)) if pad else x


# The two halves of an fp8 linear are custom ops: torch.compile sees each as one opaque node (no graph
# break at cuBLASLt's scaled_mm or the Triton launches, no recompiles per input rank), and inductor fuses
# everything around them. Outputs are contiguous, as the fake (shape-only) versions below promise.


@torch.library.custom_op("r1core::fp8_linear_fwd", mutates_args=())
def _linear_fwd(
    x2: torch.Tensor, weight: torch.Tensor, impl: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = x Wᵀ, and what backward reads: xᵀ in 128-token tiles, Wᵀ's fp8 copy, W's block scales."""
    x_q, x_s, xt_q, xt_s = quantize_dual(x2, impl)
    w_q, w_s, wt_q = quantize_blocks_t(weight, impl)
    return blockwise_gemm(x_q, x_s, w_q, w_s, x2.dtype, impl), xt_q, xt_s, wt_q, w_s


@_linear_fwd.register_fake
def _(x2, weight, impl):
    (M, K), N, Mp = x2.shape, weight.shape[0], _round_up(x2.shape[0], BLOCK)
    f32 = torch.float32
    return (
        x2.new_empty(M, N),
        x2.new_empty(K, Mp, dtype=FP8),
        x2.new_empty(K, Mp // BLOCK, dtype=f32),
        weight.new_empty(K, N, dtype=FP8),
        weight.new_empty(N // BLOCK, K // BLOCK, dtype=f32),
    )


@torch.library.custom_op("r1core::fp8_linear_bwd", mutates_args=())
def _linear_bwd(
    dy2: torch.Tensor,
    xt_q: torch.Tensor,
    xt_s: torch.Tensor,
    wt_q: torch.Tensor,
    w_s: torch.Tensor,
    w_dtype: torch.dtype,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dgrad dx = dy W (dy 1x128 along N, W 128x128) and wgrad dW = dyᵀ x (both 128x1 along tokens)."""
    dy_q, dy_s, dyt_q, dyt_s = quantize_dual(dy2, impl)
    dx = blockwise_gemm(dy_q, dy_s, wt_q, w_s.t().contiguous(), dy2.dtype, impl)
    return dx, blockwise_gemm(dyt_q, dyt_s, xt_q, xt_s, w_dtype, impl)


@_linear_bwd.register_fake
def _(dy2, xt_q, xt_s, wt_q, w_s, w_dtype, impl):
    dx = dy2.new_empty(dy2.shape[0], wt_q.shape[0])
    return dx, dy2.new_empty(dy2.shape[1], xt_q.shape[0], dtype=w_dtype)


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, impl):
        x2 = x.reshape(-1, x.shape[-1])
        y, xt_q, xt_s, wt_q, w_s = _linear_fwd(x2, weight, impl)
        # x is kept only as its fp8 128-token tiles (half of bf16's bytes): wgrad is all that reads it
        ctx.save_for_backward(xt_q, xt_s, wt_q, w_s)
        ctx.impl, ctx.w_dtype = impl, weight.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xt_q, xt_s, wt_q, w_s = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx, dw = _linear_bwd(dy2, xt_q, xt_s, wt_q, w_s, ctx.w_dtype, ctx.impl)
        return dx.view(*dy.shape[:-1], xt_q.shape[0]), dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, impl: str | None = None) -> torch.Tensor:
    """F.linear(x, weight) (no bias) with the three GEMMs in FP8; in_features, out_features % 128 == 0."""
    return _Fp8Linear.apply(x, weight, impl or backend(x.device, False))


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return fp8_linear(x, weight, "ref")


# --------------------------------------------------------------------------- grouped experts


def tile_experts(seg_E: torch.Tensor, n_rows: int, block_m: int = BLOCK) -> torch.Tensor:
    """Expert of each block_m-row tile of x_PD (segments padded to 128 rows); -1 past the last segment."""
    ends = torch.cumsum(seg_E, 0)
    starts = torch.arange(0, n_rows, block_m, device=seg_E.device)
    e = torch.searchsorted(ends, starts, right=True)
    return torch.where(starts < ends[-1], e, -1).to(torch.int32)


def _grouped_gemm_ref(x_q, x_s, w_q, w_s, seg_E, out_dtype):
    """y[rows of expert e] = dequant(x) · dequant(w[e])ᵀ; rows past the last segment are zero.

    One fp32 GEMM per 128-row tile, all of one shape, never one per segment: a GEMM library picks its
    kernel (tiling, split-K) by shape, so with per-segment GEMMs a row's last bits depended on how many
    other rows its expert received: changing later tokens re-routes them and could move earlier tokens'
    outputs, and through a router near-tie their logits (the suspected cause of issue 19's max |Δlogit|
    2.77 on an H100; `benchmarks/fp8_first_steps.py --diagnose` tells). Here a row's result depends on its
    own values only, as in the Triton kernel (one program per 128-row tile).
    """
    y = torch.zeros(x_q.shape[0], w_q.shape[1], dtype=out_dtype, device=x_q.device)
    x, w_deq = dequantize_rows(x_q, x_s), {}  # elementwise: the same values as per tile
    with _ieee_fp32(x_q.device):
        for i, e in enumerate(tile_experts(seg_E, x_q.shape[0]).tolist()):
            if e < 0:  # past the last segment
                break
            if e not in w_deq:
                w_deq[e] = _dequantize_b(w_q[e], w_s[e])
            rows = slice(i * BLOCK, (i + 1) * BLOCK)
            y[rows] = (x[rows] @ w_deq[e].T).to(out_dtype)
    return y


def _grouped_wgrad_ref(dyt_q, dyt_s, xt_q, xt_s, seg_E):
    """dw[e] = dequant(dyᵀ)[:, rows of e] · dequant(xᵀ)[:, rows of e]ᵀ (fp32)."""
    E = seg_E.numel()
    dw = torch.zeros(E, dyt_q.shape[0], xt_q.shape[0], dtype=torch.float32, device=dyt_q.device)
    dy_t, x_t = dequantize_rows(dyt_q, dyt_s), dequantize_rows(xt_q, xt_s)
    start = 0
    with _ieee_fp32(dyt_q.device):
        for e, n in enumerate(seg_E.tolist()):
            dw[e] = dy_t[:, start : start + n] @ x_t[:, start : start + n].T
            start += n
    return dw


class _GroupedFp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_PD, w_EOI, seg_E, impl):
        # A segment that is not a multiple of 128 rows (a dispatcher without pad_multiple=128, e.g. expert
        # parallelism's today) would mix two experts in one tile: fail loudly, without a host sync.
        torch._assert_async((seg_E % BLOCK == 0).all(), "fp8 experts need segments padded to 128 rows")
        x_q, x_s, xt_q, xt_s = quantize_dual(x_PD, impl)
        w_q, w_s, wt_q = quantize_blocks_t(w_EOI, impl)
        if impl == "ref":
            y = _grouped_gemm_ref(x_q, x_s, w_q, w_s, seg_E, x_PD.dtype)
        else:
            from ._fp8_triton import grouped_fp8_gemm_triton

            y = grouped_fp8_gemm_triton(x_q, x_s, w_q, w_s, tile_experts(seg_E, x_PD.shape[0]), x_PD.dtype)
        ctx.save_for_backward(xt_q, xt_s, wt_q, w_s, seg_E)
        ctx.impl, ctx.w_dtype, ctx.n_rows = impl, w_EOI.dtype, x_PD.shape[0]
        return y

    @staticmethod
    def backward(ctx, dy_PO):
        xt_q, xt_s, wt_q, w_s, seg_E = ctx.saved_tensors
        dy_q, dy_s, dyt_q, dyt_s = quantize_dual(dy_PO.contiguous(), ctx.impl)
        wt_s = w_s.transpose(1, 2).contiguous()
        if ctx.impl == "ref":
            dx = _grouped_gemm_ref(dy_q, dy_s, wt_q, wt_s, seg_E, dy_PO.dtype)
            dw = _grouped_wgrad_ref(dyt_q, dyt_s, xt_q, xt_s, seg_E)
        else:
            from ._fp8_triton import grouped_fp8_gemm_triton, grouped_fp8_wgrad_triton

            tile_e = tile_experts(seg_E, ctx.n_rows)
            dx = grouped_fp8_gemm_triton(dy_q, dy_s, wt_q, wt_s, tile_e, dy_PO.dtype)
            dw = grouped_fp8_wgrad_triton(dyt_q, dyt_s, xt_q, xt_s, seg_E)
        return dx, dw.to(ctx.w_dtype), None, None


def grouped_linear_fp8(x_PD, w_EOI, seg_E, impl: str | None = None) -> torch.Tensor:
    """Per-expert x · w[e]ᵀ over 128-padded row segments, all three GEMMs in FP8 (ref: a per-tile loop)."""
    if impl is None:
        impl = os.environ.get("R1CORE_FP8_BACKEND") or ("triton" if x_PD.is_cuda else "ref")
    impl = "triton" if impl == "torch" else impl  # torch has no blockwise grouped GEMM for sm90
    return _GroupedFp8Linear.apply(x_PD, w_EOI, seg_E, impl)


def grouped_swiglu_fp8(x_PD, w13_E2ID, w2_EDI, seg_E, impl: str | None = None) -> torch.Tensor:
    """The MoE experts' SwiGLU (gate and up stacked in w13 [E, 2, I, D]) with FP8 GEMMs; the activation
    itself runs in the input dtype.

    Gate and up projections run as one GEMM on [w1; w3] (I is a multiple of 128, so the 128x128 blocks are
    those of w1 and w3 alone): x is quantized and read once.
    """
    h13 = grouped_linear_fp8(x_PD, w13_E2ID.flatten(1, 2), seg_E, impl)
    h1, h3 = h13.chunk(2, dim=-1)
    return grouped_linear_fp8(F.silu(h1) * h3, w2_EDI, seg_E, impl)


def grouped_swiglu_fp8_ref(x_PD, w13_E2ID, w2_EDI, seg_E) -> torch.Tensor:
    return grouped_swiglu_fp8(x_PD, w13_E2ID, w2_EDI, seg_E, "ref")
