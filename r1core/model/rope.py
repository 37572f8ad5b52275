"""Rotary embeddings with the YaRN extension (Peng et al. 2023) as DeepSeek-V3 uses it.

DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ... — the released weights are laid out
for that — so the rotation is a complex multiply over adjacent pairs.
"""

from __future__ import annotations

import math

import torch

from .args import ModelArgs, yarn_mscale


def _correction_dim(n_rotations: float, dim: int, base: float, max_len: int) -> float:
    return dim * math.log(max_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [rope_dim // 2]: extrapolated for fast dims, interpolated by `rope_factor` for slow
    ones."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not args.uses_yarn:
        return freqs
    low = max(math.floor(_correction_dim(args.beta_fast, dim, base, args.original_seq_len)), 0)
    high = min(math.ceil(_correction_dim(args.beta_slow, dim, base, args.original_seq_len)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp  # 1: keep the original frequency, 0: fully interpolated
    return freqs / args.rope_factor * (1 - smooth) + freqs * smooth


_INV_FREQ: dict[tuple, torch.Tensor] = {}


def _inv_freq_on(args: ModelArgs, device: torch.device) -> torch.Tensor:
    """yarn_inv_freq on `device`, copied there once per setting and device: a copy from host memory in every
    forward waits for the stream (a host sync) and cannot be captured in a CUDA graph."""
    key = (
        args.qk_rope_head_dim,
        args.rope_theta,
        args.uses_yarn,
        args.beta_fast,
        args.beta_slow,
        args.original_seq_len,
        args.rope_factor,
        str(device),
    )
    if key not in _INV_FREQ:
        if len(_INV_FREQ) >= 64:  # many settings in one process (tests): start over
            _INV_FREQ.clear()
        _INV_FREQ[key] = yarn_inv_freq(args).to(device)
    return _INV_FREQ[key]


def rope_cos_sin(args: ModelArgs, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, rope_dim // 2] in fp32.

    Computed from positions on the fly (no [max_seq_len] table), so 128K contexts cost nothing
    until used and packed / ragged batches just pass their own positions.
    """
    inv_freq = _inv_freq_on(args, positions.device)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    # YaRN's cos/sin factor as DeepSeek's reference computes it: ym(f, mscale) / ym(f, mscale_all_dim),
    # where ym(f, 0) = 1. It is 1.0 whenever mscale == mscale_all_dim (DeepSeek-V3, V2-Lite).
    scale = 1.0
    if args.uses_yarn:
        scale = yarn_mscale(args.rope_factor, args.mscale) / yarn_mscale(
            args.rope_factor, args.mscale_all_dim
        )
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, H, R] (or [B, T, R]) by the angles in cos/sin [B, T, R/2]."""
    dtype = x.dtype
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    if x.dim() == cos.dim() + 1:  # x carries a heads dim
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.flatten(-2).to(dtype)
