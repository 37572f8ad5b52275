"""The policy loss's settings (`PolicyLossConfig`, config section `rl.loss`) and the per-token terms
shared by grpo_loss's reference and fused paths. Plain PyTorch: importing it needs no Triton.

`policy_terms` is the per-token loss (differentiable, used by the reference's autograd and for loss
values); `dloss_dlogp` is its closed-form derivative that drives the fused kernels. The formulas are
in kernels/grpo_loss.py's module docstring.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class LossAgg(str, enum.Enum):
    seq_mean_token_mean = "seq_mean_token_mean"  # GRPO paper
    token_mean = "token_mean"  # DAPO
    seq_mean_token_sum_norm = "seq_mean_token_sum_norm"  # Dr. GRPO (constant normalizer)


AGGS = tuple(a.value for a in LossAgg)


@dataclass(kw_only=True)
class PolicyLossConfig:
    """The clipped policy loss (config section `rl.loss`); grpo_loss and the trainer's objective take it."""

    beta: float = 0.0  # k3 KL weight against the frozen reference; 0 skips the reference pass
    eps_low: float = 0.2  # PPO clip below: ratio >= 1 - eps_low
    eps_high: float = 0.28  # DAPO clip-higher: ratio <= 1 + eps_high
    dual_clip: float | None = None  # dual-clip bound c > 1 for negative advantages; None = off
    agg: LossAgg = LossAgg.token_mean  # how token losses are averaged (GRPO, DAPO, Dr. GRPO)

    def __post_init__(self) -> None:
        if self.agg not in AGGS:
            raise ValueError(f"agg={getattr(self.agg, 'value', self.agg)!r}: choose one of {AGGS}")
        self.agg = LossAgg(self.agg)
        if not 0 <= self.eps_low < 1 or self.eps_high < 0:
            raise ValueError(f"eps_low={self.eps_low} must be in [0, 1) and eps_high={self.eps_high} >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip={self.dual_clip} must be > 1 (or None)")

    @property
    def context_parallel(self) -> bool:
        """Under context parallelism a rank's tokens' loss over whole-batch totals is its exact share for the
        token sums (token_mean, seq_mean_token_sum_norm); a per-row token mean needs whole rows."""
        return self.agg != LossAgg.seq_mean_token_mean


def check_scaling(temperature: float, norm_len: int | None) -> None:
    """The two numbers the loss takes from the rollout rather than from its settings."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if norm_len is not None and norm_len <= 0:
        raise ValueError(f"norm_len={norm_len} must be positive")


def policy_terms(logp, adv, old, ref, is_w, cfg: PolicyLossConfig):
    """Per-token (loss l, ratio rho, k3 KL D or None); differentiable in logp (the reference's autograd)."""
    ratio = torch.exp(logp - (logp.detach() if old is None else old))
    obj = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * adv)
    if cfg.dual_clip is not None:
        obj = torch.where(adv < 0, torch.maximum(obj, cfg.dual_clip * adv), obj)
    loss = -obj if is_w is None else -obj * is_w
    kl = None
    if ref is not None:
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        if cfg.beta != 0:
            loss = loss + cfg.beta * kl
    return loss, ratio, kl


def dloss_dlogp(logp, adv, old, ref, is_w, cfg: PolicyLossConfig) -> torch.Tensor:
    """d l / d logp of `policy_terms`, closed form: drho/dlogp = rho, and a binding clip passes nothing."""
    ratio = torch.ones_like(logp) if old is None else torch.exp(logp - old)
    unclipped = torch.where(adv >= 0, ratio <= 1 + cfg.eps_high, ratio >= 1 - cfg.eps_low)
    if cfg.dual_clip is not None:
        unclipped &= ~((adv < 0) & (ratio > cfg.dual_clip))
    coef = -(ratio * adv) * unclipped
    if is_w is not None:
        coef = coef * is_w
    if ref is not None and cfg.beta != 0:
        coef = coef + cfg.beta * (1 - torch.exp(ref - logp))
    return coef


def neutralize_unmasked(logp, mask, old, ref, is_w):
    """Tokens outside the mask must not matter, but their old / ref log-probs are often padding garbage
    and exp() of it gives inf * 0 = NaN: there they become logp (rho = 1, D = 0) and the IS weight 1."""
    keep = mask != 0
    lp = logp.detach()
    return (
        None if old is None else torch.where(keep, old, lp),
        None if ref is None else torch.where(keep, ref, lp),
        None if is_w is None else torch.where(keep, is_w, 1.0),
    )


def agg_weights(mask: torch.Tensor, cfg: PolicyLossConfig, norm_len: int | None) -> torch.Tensor:
    """w [B, T] with loss = sum(w * l); empty rows / batches give zero weight, never NaN."""
    B, T = mask.shape
    if cfg.agg == "token_mean":
        total = mask.sum()
        return mask / torch.where(total > 0, total, 1)
    if cfg.agg == "seq_mean_token_mean":
        lens = mask.sum(1, keepdim=True)
        rows = (lens > 0).sum()
        return mask / torch.where(lens > 0, lens, 1) / torch.where(rows > 0, rows, 1)
    return mask / (B * (norm_len or T))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    total = mask.sum()
    return (x * mask).sum() / torch.where(total > 0, total, 1)


def policy_stats(ratio, kl, adv, mask, cfg: PolicyLossConfig) -> dict:
    with torch.no_grad():
        low = ((ratio < 1 - cfg.eps_low) & (adv < 0)).float()
        high = ((ratio > 1 + cfg.eps_high) & (adv > 0)).float()
        return {
            "clip_frac_low": masked_mean(low, mask),
            "clip_frac_high": masked_mean(high, mask),
            "kl": masked_mean(kl, mask) if kl is not None else mask.new_zeros(()),
            "ratio": masked_mean(ratio, mask),
        }


# ----------------------------------------------------------------------------- input checks


def check_head(hidden, weight, targets, op: str, ndim: int) -> None:
    # the references also take fp64 (a tighter oracle); the kernels take bf16 / fp32
    dtypes = (
        (torch.bfloat16, torch.float32, torch.float64)
        if op.endswith("_ref")
        else (torch.bfloat16, torch.float32)
    )
    if hidden.dim() != ndim:
        raise ValueError(f"{op}: hidden must be {ndim}-D, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{op}: weight must be [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if hidden.dtype not in dtypes or weight.dtype != hidden.dtype:
        raise ValueError(
            f"{op}: hidden and weight must share one dtype of {dtypes}, got {hidden.dtype} / {weight.dtype}"
        )
    if targets.shape != hidden.shape[:-1] or targets.dtype != torch.int64:
        raise ValueError(
            f"{op}: targets must be int64 {tuple(hidden.shape[:-1])}, "
            f"got {targets.dtype} {tuple(targets.shape)}"
        )
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"{op}: hidden, weight and targets are on {hidden.device}, {weight.device}, {targets.device}"
        )


def check_targets_cpu(targets, V: int, op: str, ignore_index: int | None = None) -> None:
    """Range check where it costs no device sync; on CUDA an out-of-range id just gets logit 0."""
    if targets.device.type != "cpu" or targets.numel() == 0:
        return
    t = targets if ignore_index is None else targets[targets != ignore_index]
    if t.numel() and (t.min() < 0 or t.max() >= V):
        raise ValueError(
            f"{op}: targets must lie in [0, {V}), got range [{t.min().item()}, {t.max().item()}]"
        )


def per_token(x, name: str, B: int, T: int, device, allow_row: bool = False) -> torch.Tensor | None:
    if x is None:
        return None
    if allow_row and x.shape == (B,):
        x = x[:, None].expand(B, T)
    if x.shape != (B, T):
        raise ValueError(f"{name} must be [{B}, {T}]{' or [B]' if allow_row else ''}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, hidden on {device}")
    return x.detach().float()


def vocab_offset(weight, group) -> int:
    if group is None:
        return 0
    import torch.distributed as dist

    return dist.get_rank(group) * weight.shape[0]


def grpo_inputs(mask, advantages, old, ref, is_w, B, T, device):
    if mask is None or advantages is None:
        raise ValueError("grpo_loss: mask and advantages are required")
    return (
        per_token(mask, "mask", B, T, device),
        per_token(advantages, "advantages", B, T, device, True),
        per_token(old, "old_logprobs", B, T, device),
        per_token(ref, "ref_logprobs", B, T, device),
        per_token(is_w, "is_weights", B, T, device),
    )


def group_size(group) -> int:
    if group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group)


class PolicyLossTerms:
    """What the fused engine needs of the policy loss: per-token inputs flattened to [N] fp32, and
    coef(logp, start, end) = dloss/dlogp for tokens start:end (CETerms is the same for cross-entropy)."""

    def __init__(self, targets, mask, adv, old, ref, is_w, cfg: PolicyLossConfig, norm_len: int | None):
        flat = lambda x: None if x is None else x.reshape(-1).contiguous()  # noqa: E731
        self.targets, self.cfg = targets.reshape(-1).contiguous(), cfg
        self.mask, self.adv, self.old, self.ref, self.is_w = map(flat, (mask, adv, old, ref, is_w))
        self.weight = flat(agg_weights(mask, cfg, norm_len))

    def _inputs(self, logp, start, end):
        """(adv, old, ref, is_w) of tokens start:end, neutralized outside the mask."""
        sl = [
            None if x is None else x[start:end] for x in (self.mask, self.adv, self.old, self.ref, self.is_w)
        ]
        return (sl[1], *neutralize_unmasked(logp, *sl[:1], *sl[2:]))

    def coef(self, logp, start, end):
        return self.weight[start:end] * dloss_dlogp(logp, *self._inputs(logp, start, end), self.cfg)

    def value(self, logp):
        return (self.weight * policy_terms(logp, *self._inputs(logp, 0, logp.shape[0]), self.cfg)[0]).sum()

    def stats(self, logp):
        _, ratio, kl = policy_terms(logp, *self._inputs(logp, 0, logp.shape[0]), self.cfg)
        return policy_stats(ratio, kl, self.adv, self.mask, self.cfg)


class CETerms:
    def __init__(self, targets, ignore_index: int, reduction: str):
        self.targets = targets.contiguous()
        valid = (targets != ignore_index).float()
        n = valid.sum()
        self.weight = valid / torch.where(n > 0, n, 1) if reduction == "mean" else valid

    def coef(self, logp, start, end):
        return -self.weight[start:end]

    def value(self, logp):
        return -(self.weight * logp).sum()
