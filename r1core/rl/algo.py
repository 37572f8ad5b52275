"""GRPO's pieces between rewards and the loss: advantages, group filtering, overlong shaping, batching.

Pure functions over tensors and Samples so each is checked with exact values in tests.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .config import AdvantageEstimator, Overlong


def group_advantages(
    rewards_NG: torch.Tensor, estimator: AdvantageEstimator, eps: float = 1e-6
) -> torch.Tensor:
    """A_i = (r_i - mean(r)) / (std(r) + eps) per group of G samples; Dr. GRPO drops the std.

    std is the unbiased sample std, as TRL's and verl's GRPO use.
    """
    centered = rewards_NG - rewards_NG.mean(dim=1, keepdim=True)
    if estimator == AdvantageEstimator.dr_grpo:
        return centered
    return centered / (rewards_NG.std(dim=1, keepdim=True) + eps)


def informative_groups(rewards_NG: torch.Tensor) -> torch.Tensor:
    """Groups whose rewards are not all equal: the only ones with a non-zero GRPO gradient (DAPO §3.2)."""
    return (rewards_NG.max(dim=1).values - rewards_NG.min(dim=1).values) > 0


def overlong_shaping(
    lengths: torch.Tensor,
    truncated: torch.Tensor,
    max_new_tokens: int,
    mode: Overlong,
    buffer: int,
    penalty: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reward delta, keep-in-loss mask) for each sample.

    penalty: DAPO's soft overlong punishment, linear from 0 at (max - buffer) tokens to -penalty at max.
    filter:  truncated samples stay in the group baseline but get no loss.
    """
    delta = torch.zeros(lengths.shape, dtype=torch.float32)
    keep = torch.ones(lengths.shape, dtype=torch.bool)
    if mode == Overlong.penalty:
        start = max_new_tokens - buffer
        over = (lengths.float() - start).clamp(min=0) / max(buffer, 1)
        delta = -penalty * over.clamp(max=1.0)
    elif mode == Overlong.filter:
        keep = ~truncated
    return delta, keep


def truncated_is_weights(
    trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float
) -> torch.Tensor:
    """min(pi_trainer / pi_sampler, cap) per token: corrects the sampler/trainer probability mismatch
    (truncated importance sampling, Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL")."""
    return torch.exp(trainer_logprobs - sampler_logprobs).clamp(max=cap)


def build_policy_batch(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    sampler_logprobs: Sequence[Sequence[float]],
    advantages: Sequence[float],
    keep: Sequence[bool],
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """Right-padded training rows: tokens = (prompt + response)[:-1], targets = next tokens.

    mask[b, i] is 1 where targets[b, i] is a response token of a kept sample; `sampler_logprobs`
    is aligned with targets (0 elsewhere). Positions are plain aranges, so the causal fast path holds.
    """
    seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    L = max(len(s) for s in seqs) - 1
    B = len(seqs)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    targets = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L)
    lp = torch.zeros(B, L)
    for b, (s, p, r) in enumerate(zip(seqs, prompt_ids, response_ids)):
        n = len(s) - 1
        tokens[b, :n] = torch.tensor(s[:-1])
        targets[b, :n] = torch.tensor(s[1:])
        start = len(p) - 1  # the position whose target is the first response token
        if keep[b] and len(r):
            mask[b, start : start + len(r)] = 1.0
            lp[b, start : start + len(r)] = torch.tensor(list(sampler_logprobs[b]), dtype=torch.float32)
    return {
        "tokens": tokens,
        "targets": targets,
        "mask": mask,
        "sampler_logprobs": lp,
        "advantages": torch.tensor(list(advantages), dtype=torch.float32),
    }


def dp_shard(batch: dict[str, torch.Tensor], dp_rank: int, dp_size: int) -> dict[str, torch.Tensor]:
    """This data-parallel rank's rows. Every rank gets ceil(B / dp_size) rows, so all run the same number
    of micro-batches; the last ranks are topped up with copies of row 0 whose mask is zero (they add
    nothing to the loss, its normalizers or the gradient)."""
    if dp_size == 1:
        return batch
    B = batch["tokens"].shape[0]
    per = -(-B // dp_size)
    pad = per * dp_size - B
    if pad:
        filler = {k: v[:1].expand(pad, *v.shape[1:]).clone() for k, v in batch.items()}
        filler["mask"].zero_()
        filler["advantages"].zero_()
        batch = {k: torch.cat([v, filler[k]]) for k, v in batch.items()}
        batch["pad_row"] = torch.arange(B + pad) >= B
    return {k: v[dp_rank * per : (dp_rank + 1) * per] for k, v in batch.items()}


def split_rows(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Split a batch of rows into micro-batches of at most `size` rows (trimming trailing padding)."""
    out = []
    B = batch["tokens"].shape[0]
    for i in range(0, B, size):
        mb = {k: v[i : i + size] for k, v in batch.items()}
        width = int((mb["mask"].sum(0) > 0).nonzero().max()) + 1 if mb["mask"].any() else 1
        out.append({k: (v[:, :width] if v.dim() == 2 else v) for k, v in mb.items()})
    return out
