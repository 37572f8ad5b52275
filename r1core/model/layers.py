"""Small building blocks shared by attention, MoE and the transformer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32, scale in the input dtype: the order HF's DeepseekV3RMSNorm uses,
        # so bf16 runs round the same way as the released model's reference code.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def linear(dim_in: int, dim_out: int) -> nn.Linear:
    return nn.Linear(dim_in, dim_out, bias=False)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Dense layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = linear(dim, inter_dim)  # gate_proj
        self.w2 = linear(inter_dim, dim)  # down_proj
        self.w3 = linear(dim, inter_dim)  # up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
