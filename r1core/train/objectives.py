"""Training objectives, called by the engine on the last pipeline stage with the final hidden states.

Contract: `objective(hidden [b, t, D], head_weight, vocab_group, mb, model, denoms=None) -> (loss, metrics)`.
`head_weight` is this rank's vocab shard under TP (`vocab_group` is then the TP group, else None);
`model` is this rank's Transformer (the last stage holds the MTP modules and a copy of the embedding).

Normalization: `totals(mb)` returns the counts the loss divides by (valid tokens, sequences, ...);
the engine sums them over all microbatches and data-parallel ranks and passes the sums as
`denoms`, so summing every microbatch's loss over all ranks gives exactly the loss of the whole
batch on one device. Metrics are additive the same way (the engine sums them). Without `denoms`
the microbatch's own totals are used: one call is `Transformer.compute_loss`.

The balance (sequence-wise aux) loss of the main layers is the engine's (it is produced on every
pipeline stage); objectives add only what they compute, including the MTP blocks' balance loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from r1core.kernels.grpo_loss_terms import PolicyLossConfig, check_scaling
from r1core.model.transformer import IGNORE_INDEX, Transformer, cross_entropy_sum, mtp_targets


def _kernel_impl(device: torch.device, impl: str | None) -> str | None:
    # On CPU the fused kernels would run in the Triton interpreter: the readable ref is the fast path there.
    return impl or ("ref" if device.type == "cpu" else None)


def ce_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_group=None,
    impl: str | None = None,
) -> torch.Tensor:
    """Summed next-token CE of hidden [N, D] against targets [N] (IGNORE_INDEX skipped), vocab-parallel if
    asked.

    The fused r1core.kernels.linear_cross_entropy when it imports, else the model's reference
    (one device) or megatron-core's vocab_parallel_cross_entropy (vocab shards).
    """
    try:
        from r1core.kernels.grpo_loss import linear_cross_entropy
    except ImportError:
        linear_cross_entropy = None
    if linear_cross_entropy is not None:
        kw = {} if (impl := _kernel_impl(hidden.device, impl)) is None else {"impl": impl}
        return linear_cross_entropy(hidden, weight, targets, IGNORE_INDEX, "sum", vocab_group, **kw)
    if vocab_group is None:
        return cross_entropy_sum(hidden, weight, targets)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from r1core.parallel.comm import copy_to

    valid = targets != IGNORE_INDEX
    logits = torch.nn.functional.linear(copy_to(hidden, vocab_group), weight).float()
    losses = vocab_parallel_cross_entropy(logits[None], targets.where(valid, 0)[None])[0]
    return (losses * valid).sum()


def _n_valid(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).sum()


@dataclass
class LMObjective:
    """Next-token CE + multi-token prediction (DeepSeek-V3 eq. 21-25) + the MTP blocks' balance loss."""

    impl: str | None = None  # r1core.kernels impl for the CE; None: ref on CPU, the kernel default on GPU
    # (not a field) under context parallelism a rank's CE and MTP sums cover its chunks; `totals` counts
    # whole sequences (the engine calls it before cutting them)
    context_parallel = True

    def totals(self, mb: dict, model: Transformer | None = None) -> dict[str, torch.Tensor]:
        n_mtp = model.args.n_mtp_modules if model is not None else 0
        out = {"tokens": _n_valid(mb["labels"]), "seqs": torch.tensor(mb["labels"].shape[0])}
        for k, target in enumerate(mtp_targets(mb["labels"], mb.get("doc_ids"), n_mtp), start=1):
            out[f"mtp{k}"] = _n_valid(target)
        return out

    def __call__(self, hidden, head_weight, vocab_group, mb, model: Transformer, denoms=None):
        d = denoms if denoms is not None else self.totals(mb, model)
        tokens, labels = mb["tokens"], mb["labels"]
        ce = ce_sum(hidden.flatten(0, 1), head_weight, labels.flatten(), vocab_group, self.impl)
        ce = ce / d["tokens"].clamp(min=1)
        loss, metrics = ce, {"ce": ce.detach()}
        if not len(model.mtp) or tokens.shape[1] < 2:
            return loss, metrics
        meta = model.attn_meta(tokens, mb.get("positions"), mb.get("doc_ids"), context=mb.get("context"))
        out = model.mtp_losses(
            hidden, tokens, labels, meta, head_weight, lambda h, w, t: ce_sum(h, w, t, vocab_group, self.impl)
        )
        per_depth = [s / d[f"mtp{k}"].clamp(min=1) for k, s in enumerate(out.ce_sums, start=1)]
        mtp = sum(per_depth) / len(per_depth)
        loss = loss + model.args.mtp_loss_weight * mtp
        metrics["mtp"] = mtp.detach()
        if out.aux is not None:
            aux = out.aux * (tokens.shape[0] / d["seqs"])
            loss = loss + aux
            metrics["mtp_aux"] = aux.detach()
        return loss, metrics


_AGG_TOTAL = {"seq_mean_token_mean": "rows", "token_mean": "tokens", "seq_mean_token_sum_norm": "seqs"}


@dataclass
class GRPOObjective:
    """GRPO / DAPO / Dr. GRPO policy loss through r1core.kernels.grpo_loss (see its docstring for the math).

    mb carries targets [b, t], mask [b, t], advantages [b] or [b, t], and optionally old_logprobs,
    ref_logprobs, is_weights [b, t]. `loss.agg` picks what the loss is averaged over; across
    microbatches and ranks it is the same average over the whole batch. `temperature` is the
    sampler's, `norm_len` Dr. GRPO's constant normalizer (the response cap).
    """

    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    temperature: float = 1.0
    norm_len: int | None = None
    impl: str | None = None

    def __post_init__(self) -> None:
        check_scaling(self.temperature, self.norm_len)  # here, not at the first microbatch

    @property
    def context_parallel(self) -> bool:
        return self.loss.context_parallel

    def totals(self, mb: dict, model: Transformer | None = None) -> dict[str, torch.Tensor]:
        mask = mb["mask"].float()
        seqs = torch.tensor(mask.shape[0])
        if "pad_row" in mb:  # rows added only to even out data-parallel shards (rl.algo.dp_shard)
            seqs = seqs - mb["pad_row"].sum().to(seqs.device)
        return {"tokens": mask.sum(), "rows": (mask.sum(1) > 0).sum(), "seqs": seqs}

    def __call__(self, hidden, head_weight, vocab_group, mb, model: Transformer, denoms=None):
        from r1core.kernels.grpo_loss import grpo_loss

        own = self.totals(mb)
        d = denoms if denoms is not None else own
        key = _AGG_TOTAL[self.loss.agg.value]
        kw = {} if (impl := _kernel_impl(hidden.device, self.impl)) is None else {"impl": impl}
        loss, stats = grpo_loss(
            hidden,
            head_weight,
            mb["targets"],
            mb["mask"],
            mb["advantages"],
            mb.get("old_logprobs"),
            mb.get("ref_logprobs"),
            loss=self.loss,
            temperature=self.temperature,
            norm_len=self.norm_len,
            is_weights=mb.get("is_weights"),
            vocab_group=vocab_group,
            **kw,
        )
        # the kernel averages over this microbatch (over all its rows for "seqs"); rescale to this
        # microbatch's share of the batch
        div = mb["mask"].shape[0] if key == "seqs" else own[key]
        loss = loss * (div / d[key].clamp(min=1))
        token_share = own["tokens"] / d["tokens"].clamp(min=1)
        mask = mb["mask"].float()
        entropy = (stats["entropy"] * mask).sum() / own["tokens"].clamp(min=1)
        metrics = {"policy_loss": loss.detach(), "entropy": entropy * token_share}
        for name in ("clip_frac_low", "clip_frac_high", "kl", "ratio"):
            metrics[name] = stats[name].detach() * token_share
        return loss, metrics


class CESum:
    """The next-token CE summed over a micro-batch's labelled tokens, and their count: an
    `engine.forward_only` fn for the validation loss (r1core.train.lm.validation_ce)."""

    def __call__(self, hidden, head_weight, vocab_group, mb, model: Transformer) -> tuple[float, float]:
        labels = mb["labels"].flatten()
        ce = ce_sum(hidden.flatten(0, 1), head_weight, labels, vocab_group)
        return float(ce), float(_n_valid(labels))


@dataclass
class TokenLogprobs:
    """log pi(target) per token [b, t] of the temperature-scaled policy: an `engine.forward_only` fn for
    the old-policy and reference passes (the same quantity as `Sample.logprobs`)."""

    temperature: float = 1.0
    impl: str | None = None

    def __call__(self, hidden, head_weight, vocab_group, mb, model: Transformer) -> torch.Tensor:
        from r1core.kernels.grpo_loss import token_logprobs

        kw = {} if (impl := _kernel_impl(hidden.device, self.impl)) is None else {"impl": impl}
        return token_logprobs(
            hidden, head_weight, mb["targets"], temperature=self.temperature, vocab_group=vocab_group, **kw
        )[0]
