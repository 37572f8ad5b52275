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

from dataclasses import dataclass

import torch

from r1core.model.attention import AttnMeta
from r1core.model.transformer import IGNORE_INDEX, Transformer, cross_entropy_sum


def _kernel_impl(device: torch.device, impl: str | None) -> str | None:
    # On CPU the fused kernels would run in the Triton interpreter: the readable ref is the fast path there.
    return impl or ("ref" if device.type == "cpu" else None)


def ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_group=None,
           impl: str | None = None) -> torch.Tensor:
    """Summed next-token CE of hidden [N, D] against targets [N] (IGNORE_INDEX skipped), vocab-parallel if asked.

    The fused r1core.kernels.linear_cross_entropy when it imports, else the model's reference
    (one device) or megatron-core's vocab_parallel_cross_entropy (vocab shards).
    """
    try:
        from r1core.kernels import linear_cross_entropy
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

    def _mtp_targets(self, mb: dict, n_mtp: int) -> list[torch.Tensor]:
        labels, doc_ids, T = mb["labels"], mb.get("doc_ids"), mb["labels"].shape[1]
        targets = []
        for k in range(1, n_mtp + 1):
            if T <= k:
                break
            target = labels[:, k:]
            if doc_ids is not None:  # a depth never predicts across a document boundary
                target = target.masked_fill(doc_ids[:, k:] != doc_ids[:, : T - k], IGNORE_INDEX)
            targets.append(target)
        return targets

    def totals(self, mb: dict, model: Transformer | None = None) -> dict[str, torch.Tensor]:
        n_mtp = model.args.n_mtp_modules if model is not None else 0
        out = {"tokens": _n_valid(mb["labels"]), "seqs": torch.tensor(mb["labels"].shape[0])}
        for k, target in enumerate(self._mtp_targets(mb, n_mtp), start=1):
            out[f"mtp{k}"] = _n_valid(target)
        return out

    def __call__(self, hidden, head_weight, vocab_group, mb, model: Transformer, denoms=None):
        d = denoms if denoms is not None else self.totals(mb, model)
        tokens, labels = mb["tokens"], mb["labels"]
        ce = ce_sum(hidden.flatten(0, 1), head_weight, labels.flatten(), vocab_group, self.impl)
        ce = ce / d["tokens"].clamp(min=1)
        loss, metrics = ce, {"ce": ce.detach()}
        targets = self._mtp_targets(mb, len(model.mtp))
        if not targets:
            return loss, metrics
        meta = model.attn_meta(tokens, mb.get("positions"), mb.get("doc_ids"))
        seq_share = tokens.shape[0] / d["seqs"]
        h_prev, T, mtp_total, aux = hidden, tokens.shape[1], 0.0, None
        for k, (module, target) in enumerate(zip(model.mtp, targets), start=1):
            sub = AttnMeta(positions=meta.positions[:, : T - k], cos=meta.cos[:, : T - k], sin=meta.sin[:, : T - k],
                           doc_ids=None if meta.doc_ids is None else meta.doc_ids[:, : T - k],
                           causal_fast_path=meta.causal_fast_path)
            h_prev, aux_k = module(h_prev[:, : T - k], model.embed(tokens[:, k:]), sub)
            if aux_k is not None:
                aux = aux_k * seq_share if aux is None else aux + aux_k * seq_share
            ce_k = ce_sum(module.norm(h_prev).flatten(0, 1), head_weight, target.flatten(), vocab_group, self.impl)
            mtp_total = mtp_total + ce_k / d[f"mtp{k}"].clamp(min=1)
        mtp = mtp_total / len(targets)
        loss = loss + model.args.mtp_loss_weight * mtp
        metrics["mtp"] = mtp.detach()
        if aux is not None:
            loss = loss + aux
            metrics["mtp_aux"] = aux.detach()
        return loss, metrics


_AGG_TOTAL = {"seq_mean_token_mean": "rows", "token_mean": "tokens", "seq_mean_token_sum_norm": "seqs"}


@dataclass
class GRPOObjective:
    """GRPO / DAPO / Dr. GRPO policy loss through r1core.kernels.grpo_loss (see its docstring for the math).

    mb carries targets [b, t], mask [b, t], advantages [b] or [b, t], and optionally old_logprobs,
    ref_logprobs, is_weights [b, t]. `agg` picks what the loss is averaged over; across microbatches
    and ranks it is the same average over the whole batch.
    """

    beta: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    temperature: float = 1.0
    agg: str = "seq_mean_token_mean"
    norm_len: int | None = None
    impl: str | None = None

    def __post_init__(self) -> None:
        from r1core.kernels._grpo_objective import PolicyLossConfig

        self.agg = getattr(self.agg, "value", self.agg)
        # the kernel's own rules (agg, clip range, dual clip, temperature), checked once here rather than
        # at the first microbatch
        PolicyLossConfig(self.beta, self.eps_low, self.eps_high, self.dual_clip, self.temperature, self.agg,
                         self.norm_len)

    def totals(self, mb: dict, model: Transformer | None = None) -> dict[str, torch.Tensor]:
        mask = mb["mask"].float()
        seqs = torch.tensor(mask.shape[0])
        if "pad_row" in mb:  # rows added only to even out data-parallel shards (rl.algo.dp_shard)
            seqs = seqs - mb["pad_row"].sum().to(seqs.device)
        return {"tokens": mask.sum(), "rows": (mask.sum(1) > 0).sum(), "seqs": seqs}

    def __call__(self, hidden, head_weight, vocab_group, mb, model: Transformer, denoms=None):
        from r1core.kernels import grpo_loss

        own = self.totals(mb)
        d = denoms if denoms is not None else own
        key = _AGG_TOTAL[self.agg]
        kw = {} if (impl := _kernel_impl(hidden.device, self.impl)) is None else {"impl": impl}
        loss, stats = grpo_loss(
            hidden, head_weight, mb["targets"], mb["mask"], mb["advantages"], mb.get("old_logprobs"),
            mb.get("ref_logprobs"), beta=self.beta, eps_low=self.eps_low, eps_high=self.eps_high,
            dual_clip=self.dual_clip, temperature=self.temperature, agg=self.agg, norm_len=self.norm_len,
            is_weights=mb.get("is_weights"), vocab_group=vocab_group, **kw)
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
