"""Context parallelism: every sequence split over `cp` ranks in load-balanced causal chunks.

Layout. A sequence of T tokens is cut into 2·cp chunks of c = T / (2·cp); rank r holds chunk r and
chunk 2·cp−1−r, in that order (2c tokens, in increasing sequence order). Under a causal mask chunk j's
queries see (j + 1/2)·c keys on average, so every rank's two chunks together see the same number,
2·cp·c² in all: the causal work is balanced (Megatron's and torchtitan's "load-balanced" order).

Attention (`SequenceShard.attend`, installed through `AttnMeta.context`). MLA's keys and values are
expanded from a latent of kv_lora_rank + qk_rope_head_dim numbers per token (the normalized kv and
the rotated rope key: 576 at DeepSeek-V3 sizes). Every rank all-gathers the latents of the whole
sequence, puts them in sequence order, expands the prefix its chunks need with its own `wkv_b`, and
attends each chunk to the keys up to the chunk's end: a bottom-right-aligned causal mask, which the
memory-efficient kernels apply block-wise without materializing it; with packed documents, a
boolean mask from global token indices and document ids. The gather's backward reduce-scatters the
latents' gradient, so each rank's `wkv_a` receives the gradient of its tokens' keys from every
rank's queries. RoPE uses each token's own position (the batch's `positions`, else its index).

Why all-gather the latent rather than ring-pass K and V. Per layer and rank, a forward moves
(cp−1)/cp · T · 576 · 2 bytes (bf16) with the latent gather; a ring exchange of the expanded keys
and values (ring attention) moves (cp−1)/cp · T · 128 heads · (192 + 128) · 2 bytes: 71 times more
at V3 sizes (128K tokens, cp = 2: 72 MiB against 5.0 GiB). Backward moves the same again either way.
The price is memory: each rank expands keys and values for up to the whole sequence (one layer at a
time), as in all-gather context parallelism (Llama 3). No ring variant is built.

Multi-token prediction shifts tokens and labels by k along the sequence (`SequenceShard.shift`:
an all-gather of the integers); the sequence-wise balance loss sums its per-sequence routing counts
over the cp ranks (`apply_context_parallel`), so each rank's share of it is exact and the shares sum
to the whole sequence's loss, like the cross-entropy's. Gradients are then summed over cp × dp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.attention.bias import causal_lower_right

from r1core.model.attention import sdpa
from r1core.model.moe import MoE
from r1core.model.transformer import Transformer

from . import comm


def chunk_index(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """Sequence positions held by `rank` in local order: chunks rank and 2·cp−1−rank of 2·cp."""
    if seq_len % (2 * cp):
        raise ValueError(
            f"context parallelism cuts each sequence into 2*cp = {2 * cp} equal chunks: "
            f"sequence length {seq_len} is not a multiple of {2 * cp}"
        )
    c = seq_len // (2 * cp)
    late = 2 * cp - 1 - rank
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange(late * c, (late + 1) * c)])


def causal_work(index: torch.Tensor) -> int:
    """Query-key pairs a causal mask allows for queries at these sequence positions."""
    return int((index + 1).sum())


def merge(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of the split: every rank's local tensor (rank order) -> the whole sequence along `dim`."""
    cp = len(parts)
    seq_len = sum(p.shape[dim] for p in parts)
    order = torch.argsort(torch.cat([chunk_index(seq_len, cp, r) for r in range(cp)]))
    return torch.cat(parts, dim=dim).index_select(dim, order.to(parts[0].device))


@dataclass
class SequenceShard:
    """One microbatch's sequences as this rank holds them; the model reaches it through `AttnMeta.context`."""

    group: dist.ProcessGroup
    cp: int
    seq_len: int  # T, the whole sequence
    index: torch.Tensor  # [2c] sequence position of each local token, increasing (on the CPU)
    order: torch.Tensor  # [T] rank-major gathered row -> sequence order
    doc_ids: torch.Tensor | None  # [B, T] the whole sequence's document ids (masks of the keys)

    def attend(self, mla, q_nope, q_pe, kv, k_pe, meta) -> torch.Tensor:
        """MLA over the whole sequence's keys for this rank's queries: [B, n, H, *] -> [B, n, H, V].

        n <= 2c: a multi-token-prediction depth drops the sequence's last tokens, which are the last
        local ones (`shift`); the keys past them are padding that the causal mask never reaches.
        """
        B, n = kv.shape[:2]
        C, device = kv.shape[-1], kv.device
        lat = torch.cat([kv, k_pe], dim=-1)  # [B, n, C + R]
        if n < len(self.index):
            lat = torch.nn.functional.pad(lat, (0, 0, 0, len(self.index) - n))
        lat = comm.gather_seq(lat, self.group, dim=1).index_select(1, self.order)  # [B, T, C + R]
        last = int(self.index[n - 1])  # the last query's position: no query needs a later key
        k, v = mla.expand(*lat[:, : last + 1].split([C, lat.shape[-1] - C], dim=-1))  # [B, S, H, *]
        q = torch.cat([q_nope, q_pe], dim=-1)
        c = len(self.index) // 2
        outs = []
        for lo, hi in ((0, min(c, n)), (c, n)):
            if hi <= lo:
                continue
            end = int(self.index[hi - 1]) + 1  # the chunk's queries see keys [0, end)
            if self.doc_ids is None:
                mask = causal_lower_right(hi - lo, end)
            else:
                q_pos = self.index[lo:hi].to(device)
                causal = q_pos[:, None] >= torch.arange(end, device=device)[None, :]
                same_doc = meta.doc_ids[:, lo:hi, None] == self.doc_ids[:, None, :end]
                mask = (causal[None] & same_doc).unsqueeze(1)  # [B, 1, hi - lo, end]
            out = sdpa(
                q[:, lo:hi].transpose(1, 2),
                k[:, :end].transpose(1, 2),
                v[:, :end].transpose(1, 2),
                mask,
                mla.softmax_scale,
            )
            outs.append(out.transpose(1, 2))
        return torch.cat(outs, dim=1)

    def shift(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The local view of x[:, k:] for x [B, 2c] without gradient: the values k positions ahead of
        this rank's tokens, for those whose sequence position is below T − k (a prefix of them)."""
        parts = [torch.empty_like(x) for _ in range(self.cp)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        whole = torch.cat(parts, dim=1).index_select(1, self.order)  # [B, T]
        ahead = self.index[self.index + k < self.seq_len] + k
        return whole.index_select(1, ahead.to(x.device))


class ContextParallel:
    """Splits microbatches over a context-parallel group and gathers results back."""

    def __init__(self, group: dist.ProcessGroup, cp: int, rank: int):
        self.group, self.cp, self.rank = group, cp, rank

    def shard(self, mb: dict) -> dict:
        """This rank's part of a microbatch of whole sequences: every [rows, T, ...] tensor cut along T,
        `positions` added (the sequence positions, when the batch has none) and `context` set."""
        rows, seq_len = mb["tokens"].shape[:2]
        device = mb["tokens"].device
        index = chunk_index(seq_len, self.cp, self.rank)
        local = index.to(device)
        if "positions" not in mb:
            mb = {**mb, "positions": torch.arange(seq_len, device=device).expand(rows, seq_len)}
        gathered = torch.cat([chunk_index(seq_len, self.cp, r) for r in range(self.cp)])
        context = SequenceShard(
            self.group, self.cp, seq_len, index, torch.argsort(gathered).to(device), mb.get("doc_ids")
        )
        out = {}
        for key, value in mb.items():
            along_seq = (
                isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (rows, seq_len)
            )
            out[key] = value.index_select(1, local) if along_seq else value
        out["context"] = context
        return out

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Local [B, 2c, ...] -> the whole sequence [B, T, ...] on every rank (no gradient)."""
        parts = [torch.empty_like(x) for _ in range(self.cp)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return merge(parts)


def _sum_over(group):
    def seq_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    return seq_sum


def apply_context_parallel(model: Transformer, topo) -> None:
    """Sequence-wise balance losses count routing over the whole sequence (summed over the cp group)."""
    for moe in model.modules():
        if isinstance(moe, MoE):
            moe.seq_sum = _sum_over(topo.cp_group)
