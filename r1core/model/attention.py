"""Multi-head Latent Attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1).

Keys and values are reconstructed from a `kv_lora_rank` latent plus one shared decoupled rope key.
Two equivalent ways to attend:
- naive: expand the latent into per-head K/V with `wkv_b` and run SDPA (training, prefill);
- absorbed: fold `wkv_b` into the query and the output so attention runs in latent space
  (decode; what DeepSeek's inference code does). The KV cache stores only the latent and the
  rope key: (kv_lora_rank + qk_rope_head_dim) numbers per token and layer.

Legend: B batch, T query tokens, S key tokens, H heads, C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .args import ModelArgs
from .layers import RMSNorm, linear
from .rope import apply_rope


@dataclass
class AttnMeta:
    """Where each query token sits. Shared by every layer of one forward.

    positions: [B, T] absolute positions (rope angles, causal order).
    doc_ids:   [B, T] optional; with packing, tokens attend only within their own document.
    cos, sin:  [B, T, R/2] rope tables for `positions`.
    causal_fast_path: positions are arange(T) per row and there are no documents or cache,
        so SDPA's built-in causal mask is exact.
    context: None on one device. Under context parallelism (r1core.parallel.context) these T tokens
        are this rank's pieces of longer sequences, and `context` reaches the rest: its
        attend(mla, q_nope, q_pe, kv, k_pe, meta) -> [B, T, H, V] attends to the whole sequence's
        keys, and shift(x, k) is `shift` below over the whole sequence.
    """

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    doc_ids: torch.Tensor | None = None
    causal_fast_path: bool = False
    context: Any = None

    def shift(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """x[:, k:] for a per-token tensor x [B, T]: the value k tokens ahead, where there is one."""
        return x[:, k:] if self.context is None else self.context.shift(x, k)

    def prefix(self, n: int) -> "AttnMeta":
        """The first n positions of every row (multi-token prediction depth k runs on T - k of them)."""
        return replace(
            self,
            positions=self.positions[:, :n],
            cos=self.cos[:, :n],
            sin=self.sin[:, :n],
            doc_ids=None if self.doc_ids is None else self.doc_ids[:, :n],
        )

    def training_mask(self) -> torch.Tensor:
        """Boolean [B, 1, T, T]: True where query t may attend key s."""
        pos = self.positions
        t = torch.arange(pos.shape[1], device=pos.device)
        allowed = t[None, :, None] >= t[None, None, :]
        if self.doc_ids is not None:
            allowed = allowed & (self.doc_ids[:, :, None] == self.doc_ids[:, None, :])
        return allowed.unsqueeze(1)


# With an explicit mask, cuDNN's SDPA backward (the default on H100 since torch 2.11) returns NaN in
# dQ when T % 128 == 64 and a row's logsumexp is below ln(FLT_MAX) ~ -88.7: the padded half of the last
# key tile is scored 0 instead of -inf (pytorch/pytorch#196678). Masked attention therefore runs on the
# memory-efficient kernel (or math); the mask-free causal path keeps every backend.
MASKED_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """F.scaled_dot_product_attention on [B, H, T, *]: causal when `mask` is None, else boolean `mask`."""
    with sdpa_kernel(MASKED_SDPA_BACKENDS) if mask is not None and q.is_cuda else nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)


class LatentKVCache:
    """Per-layer latent cache: kv [L, N, S, C] (normalized latent) and pe [L, N, S, R] (rotated rope key).

    A token at absolute position p of cache row n lives in slot p, so ragged rows (continuous
    batching) need no bookkeeping beyond each row's positions. `rows` maps batch rows to cache
    rows when a batch uses a subset of them.
    """

    def __init__(
        self, args: ModelArgs, n_layers: int, n_rows: int, max_len: int, device=None, dtype=torch.float32
    ):
        self.kv = torch.zeros(n_layers, n_rows, max_len, args.kv_lora_rank, device=device, dtype=dtype)
        self.pe = torch.zeros(n_layers, n_rows, max_len, args.qk_rope_head_dim, device=device, dtype=dtype)
        self.rows: torch.Tensor | None = None

    @property
    def max_len(self) -> int:
        return self.kv.shape[2]

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + self.pe.numel() * self.pe.element_size()

    def update(self, layer: int, positions: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor, n_keys: int):
        """Store [B, T, C] / [B, T, R] at `positions`; return the first `n_keys` slots of the batch's rows."""
        rows = self.rows if self.rows is not None else torch.arange(kv.shape[0], device=kv.device)
        r = rows[:, None].expand_as(positions)
        self.kv[layer][r, positions] = kv.to(self.kv.dtype)
        self.pe[layer][r, positions] = pe.to(self.pe.dtype)
        return self.kv[layer][rows, :n_keys], self.pe[layer][rows, :n_keys]


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.qk_head_dim = args.qk_head_dim
        self.v_head_dim = args.v_head_dim
        self.softmax_scale = args.softmax_scale
        if self.q_lora_rank == 0:
            self.wq = linear(args.dim, self.n_heads * self.qk_head_dim)
        else:
            self.wq_a = linear(args.dim, self.q_lora_rank)
            self.q_norm = RMSNorm(self.q_lora_rank, args.norm_eps)
            self.wq_b = linear(self.q_lora_rank, self.n_heads * self.qk_head_dim)
        self.wkv_a = linear(args.dim, self.kv_lora_rank + self.qk_rope_head_dim)
        self.kv_norm = RMSNorm(self.kv_lora_rank, args.norm_eps)
        self.wkv_b = linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim))
        self.wo = linear(self.n_heads * self.v_head_dim, args.dim)

    def _queries(self, x: torch.Tensor, meta: AttnMeta):
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.unflatten(-1, (self.n_heads, self.qk_head_dim))  # [B, T, H, nope+R]
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, meta.cos, meta.sin)

    def _latents(self, x: torch.Tensor, meta: AttnMeta):
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_norm(kv), apply_rope(k_pe, meta.cos, meta.sin)  # [B, T, C], [B, T, R]

    def forward(
        self, x: torch.Tensor, meta: AttnMeta, cache: LatentKVCache | None = None, absorb: bool | None = None
    ) -> torch.Tensor:
        q_nope, q_pe = self._queries(x, meta)
        kv, k_pe = self._latents(x, meta)
        if cache is None and meta.context is not None:
            return self.wo(meta.context.attend(self, q_nope, q_pe, kv, k_pe, meta).flatten(2))
        if cache is None:
            mask = None if meta.causal_fast_path else meta.training_mask()
        else:
            n_keys = int(meta.positions.max()) + 1
            kv, k_pe = cache.update(self.layer_id, meta.positions, kv, k_pe, n_keys)
            kv, k_pe = kv.to(x.dtype), k_pe.to(x.dtype)
            slots = torch.arange(n_keys, device=x.device)
            mask = (slots[None, None, :] <= meta.positions[:, :, None]).unsqueeze(1)  # [B, 1, T, S]
        if absorb is None:
            absorb = cache is not None and x.shape[1] == 1
        if absorb:
            out = self._attend_absorbed(q_nope, q_pe, kv, k_pe, mask)
        else:
            out = self._attend_naive(q_nope, q_pe, kv, k_pe, mask)
        return self.wo(out.flatten(2))

    def expand(self, kv: torch.Tensor, k_pe: torch.Tensor):
        """Per-head keys [B, S, H, nope+R] and values [B, S, H, V] from latents [B, S, C] and rope keys."""
        B, S = kv.shape[:2]
        kv = self.wkv_b(kv).unflatten(-1, (self.n_heads, self.qk_nope_head_dim + self.v_head_dim))
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # [B, S, H, *]
        return torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, self.n_heads, -1)], dim=-1), v

    def _attend_naive(self, q_nope, q_pe, kv, k_pe, mask):
        k, v = self.expand(kv, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.softmax_scale)
        return out.transpose(1, 2)  # [B, T, H, V]

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, nope, C], W_UV [H, V, C]): `wkv_b` split into what the query and the output absorb."""
        wkv_b = self.wkv_b.weight.view(
            self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank
        )
        return wkv_b[:, : self.qk_nope_head_dim], wkv_b[:, self.qk_nope_head_dim :]

    def _attend_absorbed(self, q_nope, q_pe, kv, k_pe, mask):
        w_uk, w_uv = self.absorbed_weights()
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
        scores = torch.einsum("bthc,bsc->bhts", q_lat, kv) + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)
        scores = scores.float() * self.softmax_scale
        if mask is None:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(kv.dtype)
        out_lat = torch.einsum("bhts,bsc->bthc", probs, kv)
        return torch.einsum("bthc,hdc->bthd", out_lat, w_uv)
