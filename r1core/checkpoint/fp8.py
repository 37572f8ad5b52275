"""Block-scaled FP8 weights as DeepSeek-V3 releases them.

A quantized weight W [O, I] is stored as float8_e4m3fn plus `weight_scale_inv` fp32
[ceil(O/bo), ceil(I/bi)] (bo x bi = `quantization_config.weight_block_size`, 128 x 128 in the
release): W[r, c] = fp8[r, c] * scale_inv[r // bo, c // bi]. Edge blocks may be partial.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    rows, cols = shape
    return (-(-rows // block[0]), -(-cols // block[1]))


def dequantize_block_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """fp8 [O, I] * per-block scale_inv -> `dtype` [O, I], computed in fp32 on weight's device.

    Works one block-row at a time so the fp32 temporary is bo x I, not O x I (DeepSeek-V3's
    largest weights would need 0.5 GB each otherwise).
    """
    if weight.dim() != 2:
        raise ValueError(f"block fp8 weights are 2-D, got shape {tuple(weight.shape)}")
    expected = scale_shape(tuple(weight.shape), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv shape {list(scale_inv.shape)} does not match weight {list(weight.shape)} "
            f"with block {list(block)}: expected {list(expected)}"
        )
    rows, cols = weight.shape
    bo, bi = block
    scale = scale_inv.to(device=weight.device, dtype=torch.float32)
    out = torch.empty(rows, cols, dtype=dtype, device=weight.device)
    for r in range(expected[0]):
        lo, hi = r * bo, min((r + 1) * bo, rows)
        col_scale = scale[r].repeat_interleave(bi)[:cols]  # [I]
        out[lo:hi] = (weight[lo:hi].float() * col_scale).to(dtype)
    return out
