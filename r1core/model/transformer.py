"""The DeepSeek-V3 transformer: MLA blocks, dense then MoE feed-forwards, multi-token prediction.

Single device, no torch.distributed: `r1core.parallel` shards it after construction. Layers sit
in a ModuleDict keyed by their global index so a pipeline stage can drop the layers it does not
own (and `embed` / `norm` / `head` may be None on middle stages) without renumbering anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .args import Impl, ModelArgs
from .attention import MLA, AttnMeta, LatentKVCache
from .layers import MLP, RMSNorm, linear
from .moe import MoE
from .precision import apply_precision
from .rope import rope_cos_sin

IGNORE_INDEX = -100

# (hidden [N, D], head weight [V, D], targets [N]) -> summed CE over targets != IGNORE_INDEX
CrossEntropyFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def mtp_targets(
    labels: torch.Tensor, doc_ids: torch.Tensor | None, depths: int, shift: Callable | None = None
) -> list[torch.Tensor]:
    """Targets [B, T - k] of MTP depths k = 1..depths (fewer when T <= depths).

    Depth k at position i predicts labels[i + k]; never across a document boundary (IGNORE_INDEX there).
    `shift(x, k)` is x[:, k:] or, under context parallelism, `AttnMeta.shift` over the whole sequence.
    """
    shift = shift or (lambda x, k: x[:, k:])
    targets = []
    for k in range(1, min(depths, labels.shape[1] - 1) + 1):
        target = shift(labels, k)
        if doc_ids is not None:
            target = target.masked_fill(shift(doc_ids, k) != doc_ids[:, : target.shape[1]], IGNORE_INDEX)
        targets.append(target)
    return targets


def cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reference CE: materializes [N, V] fp32 logits. The trainer swaps in the fused kernel."""
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


class Block(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = MLA(args, layer_id)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        is_dense = layer_id < args.n_dense_layers
        self.ffn = MLP(args.dim, args.inter_dim) if is_dense else MoE(args)

    def forward(self, x: torch.Tensor, meta: AttnMeta, cache: LatentKVCache | None = None):
        x = x + self.attn(self.attn_norm(x), meta, cache)
        h = self.ffn(self.ffn_norm(x))
        aux = None
        if isinstance(h, tuple):
            h, aux = h
        return x + h, aux


class MTPModule(nn.Module):
    """One multi-token-prediction depth: h' = eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)]), then a block.

    The concat order (embedding first) and the names follow the released checkpoint
    (`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`); the embedding and output head are the
    main model's.
    """

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.enorm = RMSNorm(args.dim, args.norm_eps)
        self.hnorm = RMSNorm(args.dim, args.norm_eps)
        self.eh_proj = linear(2 * args.dim, args.dim)
        self.block = Block(layer_id, args)
        self.norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, meta: AttnMeta):
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.block(x, meta)


@dataclass
class MTPOutput:
    ce_sums: list[torch.Tensor]  # per depth: CE summed over its valid targets
    n_valid: list[torch.Tensor]  # per depth: how many targets are valid
    aux: torch.Tensor | None  # the MTP blocks' balance loss (None without MoE or outside training)


@dataclass
class LossOutput:
    loss: torch.Tensor  # what backward runs on: ce + mtp_weight * mean(mtp) + aux
    ce: torch.Tensor  # main next-token CE, mean over target tokens
    mtp: list[torch.Tensor]  # per-depth CE, mean over target tokens
    aux: torch.Tensor  # sequence-wise balance loss (already scaled by alpha)
    n_tokens: int


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): Block(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.head = linear(args.dim, args.vocab_size)
        if args.tie_embeddings:
            self.head.weight = self.embed.weight
        self.mtp = nn.ModuleList(MTPModule(args.n_layers + k, args) for k in range(args.n_mtp_modules))
        self.reset_parameters()
        apply_precision(self, args.precision)  # fp8: DeepSeek-V3's FP8 GEMMs (model/precision.py)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.args.init_std
        up = None  # the up half of a routed experts' w13, drawn after their w2
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            if name.endswith("norm.weight") or ".enorm." in name or ".hnorm." in name:
                p.fill_(1.0)
            elif name.endswith("experts.w13"):
                # draws in the order of separate gate, down and up weights (w1, w2, w3), so a seed gives
                # the model it gave before gate and up were stacked
                p[:, 0].copy_(torch.empty_like(p[:, 0]).normal_(0.0, std))
                up = p[:, 1]
            else:
                p.normal_(0.0, std)
                if up is not None and name.endswith("experts.w2"):
                    up.copy_(torch.empty_like(up).normal_(0.0, std))
                    up = None

    def set_moe_impl(self, impl: Impl | str) -> None:
        for m in self.modules():
            if isinstance(m, MoE):
                m.set_impl(Impl(impl))

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def attn_meta(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cached: bool = False,
        context=None,
    ) -> AttnMeta:
        """Rope tables and masking facts for one forward; `context`: see AttnMeta (context parallelism)."""
        B, T = tokens.shape[:2]
        fast = positions is None and doc_ids is None and not cached
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        cos, sin = rope_cos_sin(self.args, positions)
        return AttnMeta(
            positions=positions, cos=cos, sin=sin, doc_ids=doc_ids, causal_fast_path=fast, context=context
        )

    def forward_layers(self, h: torch.Tensor, meta: AttnMeta, cache: LatentKVCache | None = None):
        aux_total = h.new_zeros((), dtype=torch.float32)
        for block in self.layers.values():
            h, aux = block(h, meta, cache)
            if aux is not None:
                aux_total = aux_total + aux
        return h, aux_total

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: LatentKVCache | None = None,
    ):
        """Final normalized hidden states [B, T, D] (the head's input) and the summed balance loss."""
        meta = self.attn_meta(tokens, positions, doc_ids, cached=cache is not None)
        h, aux = self.forward_layers(self.embed(tokens), meta, cache)
        return self.norm(h), aux

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: LatentKVCache | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab]. Multi-token prediction is off here (training and speculation use
        `compute_loss`)."""
        h, _ = self.hidden_states(tokens, positions, doc_ids, cache)
        return self.head(h)

    def mtp_losses(
        self,
        h_main: torch.Tensor,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        meta: AttnMeta,
        head_weight: torch.Tensor,
        ce_sum: CrossEntropyFn = cross_entropy_sum,
    ) -> MTPOutput:
        """Multi-token prediction (DeepSeek-V3 §2.2, eq. 21-25) on top of the main model's output.

        h_main [B, T, D] is the main model's final normalized hidden state. Depth k combines the
        previous depth's state at position i with the embedding of tokens[i + k] and predicts
        labels[i + k] (`mtp_targets`). The trainer passes its own `ce_sum` (fused, vocab-parallel)
        and divides the sums by totals over the whole batch.
        """
        targets = mtp_targets(labels, meta.doc_ids, len(self.mtp), meta.shift)
        out = MTPOutput(ce_sums=[], n_valid=[], aux=None)
        h_prev = h_main
        for k, (module, target) in enumerate(zip(self.mtp, targets), start=1):
            n = target.shape[1]  # T - k
            h_prev, aux_k = module(h_prev[:, :n], self.embed(meta.shift(tokens, k)), meta.prefix(n))
            if aux_k is not None:
                out.aux = aux_k if out.aux is None else out.aux + aux_k
            out.ce_sums.append(ce_sum(module.norm(h_prev).flatten(0, 1), head_weight, target.flatten()))
            out.n_valid.append((target != IGNORE_INDEX).sum())
        return out

    def compute_loss(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        ce_sum: CrossEntropyFn = cross_entropy_sum,
    ) -> LossOutput:
        """Next-token CE + multi-token prediction (`mtp_losses`) + balance loss, on one device.

        labels[b, i] is the target after tokens[b, i] (IGNORE_INDEX to skip).
        """
        meta = self.attn_meta(tokens, None, doc_ids)
        h, aux = self.forward_layers(self.embed(tokens), meta)
        h_main = self.norm(h)
        n = (labels != IGNORE_INDEX).sum().clamp(min=1)
        ce = ce_sum(h_main.flatten(0, 1), self.head.weight, labels.flatten()) / n
        mtp = self.mtp_losses(h_main, tokens, labels, meta, self.head.weight, ce_sum)
        if mtp.aux is not None:
            aux = aux + mtp.aux
        mtp_losses = [s / n_k.clamp(min=1) for s, n_k in zip(mtp.ce_sums, mtp.n_valid)]
        loss = ce + aux
        if mtp_losses:
            loss = loss + self.args.mtp_loss_weight * torch.stack(mtp_losses).mean()
        return LossOutput(loss=loss, ce=ce, mtp=mtp_losses, aux=aux, n_tokens=int(n))

    def new_cache(self, n_rows: int, max_len: int, dtype: torch.dtype | None = None) -> LatentKVCache:
        p = self.head.weight if self.head is not None else next(self.parameters())
        return LatentKVCache(
            self.args, self.args.n_layers, n_rows, max_len, device=p.device, dtype=dtype or p.dtype
        )
