"""Token sampling that is reproducible per request and free of host syncs (CUDA-graph safe).

Each request owns a stream of uniforms u_0, u_1, ... drawn once on the CPU from its own seed
(`request_uniforms`); step i samples by inverting the CDF of the (truncated) distribution at
u_i. A request's tokens therefore depend only on its seed and its own logits, never on which
rows share the batch, and the whole step is tensor ops on the device.

Legend: B rows, V vocabulary.
"""

from __future__ import annotations

import torch


def request_uniforms(seed: int, n: int) -> torch.Tensor:
    """The first n uniforms in [0, 1) of a request's stream (fp64, CPU, identical on every machine)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=gen, dtype=torch.float64)


def _inverse_cdf(probs_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i]: zero-probability entries are never picked."""
    cdf_BV = probs_BV.double().cumsum(-1)
    target_B1 = (u_B.double() * cdf_BV[:, -1])[:, None]  # scale by the total: no renormalization pass
    idx_B1 = torch.searchsorted(cdf_BV, target_B1, right=True)
    return idx_B1.clamp_(max=probs_BV.shape[-1] - 1)[:, 0]


def sample(
    logits_BV: torch.Tensor,
    temperature_B: torch.Tensor,
    top_p_B: torch.Tensor,
    top_k_B: torch.Tensor,
    u_B: torch.Tensor,
    truncate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B] int64, logprobs [B] fp32) for one step.

    Rows with temperature 0 take the argmax (lowest index on ties). Others sample from
    softmax(logits / T) restricted to the top_k most likely tokens (0: all) and to the smallest
    prefix of them whose mass reaches top_p. The returned logprob is always taken from the full
    temperature-scaled distribution (unscaled for greedy rows): the trainer's importance ratio
    compares against exactly that. `truncate=False` skips the vocabulary sort when no row uses
    top-k / top-p (a static choice, so each variant is its own CUDA graph).
    """
    logits_BV = logits_BV.float()
    greedy_B = temperature_B <= 0
    inv_t_B = torch.where(greedy_B, torch.ones_like(temperature_B), 1.0 / temperature_B.clamp(min=1e-6))
    logp_BV = (logits_BV * inv_t_B[:, None]).log_softmax(-1)
    if truncate:
        sorted_logp_BV, order_BV = logp_BV.sort(dim=-1, descending=True, stable=True)
        probs_BV = sorted_logp_BV.exp()
        rank_V = torch.arange(probs_BV.shape[-1], device=probs_BV.device)
        keep_BV = (top_k_B[:, None] <= 0) | (rank_V[None, :] < top_k_B[:, None])
        mass_before_BV = probs_BV.cumsum(-1) - probs_BV
        keep_BV &= (mass_before_BV < top_p_B[:, None]) | (top_p_B[:, None] >= 1)
        sampled_B = order_BV.gather(1, _inverse_cdf(probs_BV * keep_BV, u_B)[:, None])[:, 0]
    else:
        sampled_B = _inverse_cdf(logp_BV.exp(), u_B)
    tokens_B = torch.where(greedy_B, logits_BV.argmax(-1), sampled_B)
    return tokens_B, logp_BV.gather(1, tokens_B[:, None])[:, 0]
