"""Token sampling that is reproducible per request and free of host syncs (CUDA-graph safe).

Each request owns a stream of uniforms u_0, u_1, ... drawn once on the CPU from its own seed
(`request_uniforms`); step i samples by inverting the CDF of the (truncated) distribution at
u_i. A request's tokens therefore depend only on its seed and its own logits, never on which
rows share the batch, and the whole step is tensor ops on the device.

On CUDA the untruncated path (no top-k / top-p: the RL rollouts') samples with one Triton kernel
(`r1core.kernels.inverse_cdf`: the same fp64 inverse CDF without materializing it).

The two prefix sums over the vocabulary (top-p's sorted mass, the inverse CDF) go through
`vocab_cumsum`, which under torch.compile is an opaque op running aten's cumsum: inductor never lowers
a vocabulary-long scan. On CUDA, inductor splits a scan over more than 8192 entries across blocks when
it has few rows (B < 2 x SMs: 264 on an H100), and torch 2.11 may fuse that split scan with a
reduction over the same rows (here the log-softmax's), which its split-scan code generator cannot emit
("NYI TritonSplitDimKernel reductions", pytorch#183250; torch 2.13 refuses the fusion, pytorch#183653):
the small preset (V 32768) compiled at B1024 but not at B64 / B256. The opaque op also keeps the
compiled sampler's sums those of the uncompiled one (aten's kernel either way).

Legend: B rows, V vocabulary.
"""

from __future__ import annotations

import torch


def request_uniforms(seed: int, n: int) -> torch.Tensor:
    """The first n uniforms in [0, 1) of a request's stream (fp64, CPU, identical on every machine)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=gen, dtype=torch.float64)


@torch.library.custom_op("r1core::vocab_cumsum", mutates_args=())
def _vocab_cumsum_op(x_BV: torch.Tensor) -> torch.Tensor:
    return x_BV.cumsum(-1).contiguous()


@_vocab_cumsum_op.register_fake
def _(x_BV: torch.Tensor) -> torch.Tensor:
    return x_BV.new_empty(x_BV.shape)


def vocab_cumsum(x_BV: torch.Tensor) -> torch.Tensor:
    """x.cumsum(-1); under torch.compile an opaque op (see the module docstring)."""
    if torch.compiler.is_compiling():
        return _vocab_cumsum_op(x_BV)
    return x_BV.cumsum(-1)


def _inverse_cdf(probs_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Index i with cdf[i-1] <= u * total < cdf[i]: zero-probability entries are never picked."""
    cdf_BV = vocab_cumsum(probs_BV.double())
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
        mass_before_BV = vocab_cumsum(probs_BV) - probs_BV
        keep_BV &= (mass_before_BV < top_p_B[:, None]) | (top_p_B[:, None] >= 1)
        sampled_B = order_BV.gather(1, _inverse_cdf(probs_BV * keep_BV, u_B)[:, None])[:, 0]
    elif logp_BV.is_cuda:
        from r1core.kernels.inverse_cdf import inverse_cdf  # one pass over logp, no [B, V] fp64 copies

        sampled_B = inverse_cdf(logp_BV, u_B)
    else:
        sampled_B = _inverse_cdf(logp_BV.exp(), u_B)
    tokens_B = torch.where(greedy_B, logits_BV.argmax(-1), sampled_B)
    return tokens_B, logp_BV.gather(1, tokens_B[:, None])[:, 0]
