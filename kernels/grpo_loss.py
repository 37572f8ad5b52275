"""Fused GRPO loss and linear cross-entropy straight from final hidden states and the output head.

Objective (DeepSeekMath §4.1 / DeepSeek-R1 eq. 1-2, maximized; the loss is its negative):
    z_t    = h_t . W^T / temperature,          logp_t = log_softmax(z_t)[target_t]
    rho_t  = exp(logp_t - old_t)               (old = logp.detach() when old_logprobs is None)
    o_t    = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)
             and for A < 0 with dual clip c > 1: o_t = max(o_t, c A)     (Ye et al. 2020, dual-clip PPO)
    D_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                 (k3, Schulman's KL approximation)
    l_t    = -is_t * o_t + beta * D_t         (is_t: truncated IS weight, on the policy term only, as verl)
    loss   = sum_t w_t l_t with w from `agg`:
             seq_mean_token_mean      w = m_bt / (len_b * #rows with len_b > 0)     (GRPO)
             token_mean               w = m_bt / sum(m)                              (DAPO)
             seq_mean_token_sum_norm  w = m_bt / (B * norm_len)                      (Dr. GRPO)
Every l_t depends on the logits only through logp_t, so with c_t = dloss/dlogp_t (closed form in
`_dloss_dlogp`) the gradient w.r.t. the raw logits is  c_t / temperature * (onehot(target_t) - p_t):
one scalar per token drives the whole vocabulary row. Cross-entropy is the case c_t = -valid_t / n.

Implementations (`impl`):
- "chunked" (default): token chunks of C rows; per chunk cuBLAS writes logits [C, V] in the input
  dtype, a Triton row kernel sweeps each row twice (online log-sum-exp / entropy / target logit, then
  the gradient written over the logits in place), and cuBLAS finishes grad_h = G W and grad_W += G^T h.
  The loss is a scalar, so all gradients are computed during the forward and scaled by grad_output in
  backward (Liger's trick): logits are computed once, 6NHV FLOPs (the floor: logits, grad_h, grad_W),
  all in cuBLAS. The extra HBM traffic is ~6 bytes per logit (two bf16 reads, one write). C keeps the
  buffer under CHUNK_BYTES (768 MiB: C = 2048 at V = 151936 bf16); fewer, larger chunks matter because
  every chunk re-reads and re-writes grad_W ([V, H], bf16 accumulation in cuBLAS's addmm as Liger does).
- "chunked_fp32": the same with fp32 logits (torch.mm out_dtype; bf16 gradient written into the first
  half of each fp32 row). Log-probs carry fp32 rather than bf16 logit rounding, at 4 more bytes read per
  logit and half the chunk rows.
- "triton": pure Triton tiles (tl.dot), logits never stored, not even per chunk; the backward recomputes
  them (8NHV) and accumulates grad_W / grad_h in fp32 buffers. A fallback, not a speed path.
- "ref": `grpo_loss_ref` (materialized [N, V] logits, autograd).
Vocab parallel (`vocab_group`): `weight` is this rank's rows [r V/tp, (r+1) V/tp); the per-token
(max, sum-exp, entropy, target logit) partials are all-reduced, grad_h is all-reduced (sum) in backward.

References: Shao et al. 2024 (DeepSeekMath, GRPO); Yu et al. 2025 (DAPO, token_mean, clip-higher);
Liu et al. 2025 (Dr. GRPO); Milakov & Gimelshein 2018 (online softmax); Wijmans et al. 2024 (Cut Your
Losses, tiled CE); Liger-Kernel fused linear CE (gradients in the forward).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _grpo_triton as tk

AGGS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
IMPLS = ("chunked", "chunked_fp32", "triton", "ref")
DEFAULT_IMPL = "chunked"
CHUNK_BYTES = 768 << 20  # per-chunk logits buffer budget of the chunked paths


# ----------------------------------------------------------------------------- objective (shared)

@dataclass(frozen=True)
class PolicyLossConfig:
    beta: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    temperature: float = 1.0
    agg: str = "seq_mean_token_mean"
    norm_len: int | None = None

    def __post_init__(self) -> None:
        if self.agg not in AGGS:
            raise ValueError(f"agg={self.agg!r}: choose one of {AGGS}")
        if not 0 <= self.eps_low < 1 or self.eps_high < 0:
            raise ValueError(f"eps_low={self.eps_low} must be in [0, 1) and eps_high={self.eps_high} >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip={self.dual_clip} must be > 1 (or None)")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        if self.norm_len is not None and self.norm_len <= 0:
            raise ValueError(f"norm_len={self.norm_len} must be positive")


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


def _dloss_dlogp(logp, adv, old, ref, is_w, cfg: PolicyLossConfig) -> torch.Tensor:
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


def _agg_weights(mask: torch.Tensor, cfg: PolicyLossConfig) -> torch.Tensor:
    """w [B, T] with loss = sum(w * l); empty rows / batches give zero weight, never NaN."""
    B, T = mask.shape
    if cfg.agg == "token_mean":
        total = mask.sum()
        return mask / torch.where(total > 0, total, 1)
    if cfg.agg == "seq_mean_token_mean":
        lens = mask.sum(1, keepdim=True)
        rows = (lens > 0).sum()
        return mask / torch.where(lens > 0, lens, 1) / torch.where(rows > 0, rows, 1)
    return mask / (B * (cfg.norm_len or T))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    total = mask.sum()
    return (x * mask).sum() / torch.where(total > 0, total, 1)


def _policy_stats(ratio, kl, adv, mask, cfg: PolicyLossConfig) -> dict:
    with torch.no_grad():
        low = ((ratio < 1 - cfg.eps_low) & (adv < 0)).float()
        high = ((ratio > 1 + cfg.eps_high) & (adv > 0)).float()
        return {"clip_frac_low": _masked_mean(low, mask), "clip_frac_high": _masked_mean(high, mask),
                "kl": _masked_mean(kl, mask) if kl is not None else mask.new_zeros(()),
                "ratio": _masked_mean(ratio, mask)}


# ----------------------------------------------------------------------------- input checks

def _check_head(hidden, weight, targets, op: str, ndim: int) -> None:
    # the references also take fp64 (a tighter oracle); the kernels take bf16 / fp32
    dtypes = (torch.bfloat16, torch.float32, torch.float64) if op.endswith("_ref") else (torch.bfloat16, torch.float32)
    if hidden.dim() != ndim:
        raise ValueError(f"{op}: hidden must be {ndim}-D, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{op}: weight must be [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if hidden.dtype not in dtypes or weight.dtype != hidden.dtype:
        raise ValueError(f"{op}: hidden and weight must share one dtype of {dtypes}, got {hidden.dtype} / {weight.dtype}")
    if targets.shape != hidden.shape[:-1] or targets.dtype != torch.int64:
        raise ValueError(f"{op}: targets must be int64 {tuple(hidden.shape[:-1])}, "
                         f"got {targets.dtype} {tuple(targets.shape)}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"{op}: hidden, weight and targets are on {hidden.device}, {weight.device}, {targets.device}")


def _check_targets_cpu(targets, V: int, op: str, ignore_index: int | None = None) -> None:
    """Range check where it costs no device sync; on CUDA an out-of-range id just gets logit 0."""
    if targets.device.type != "cpu" or targets.numel() == 0:
        return
    t = targets if ignore_index is None else targets[targets != ignore_index]
    if t.numel() and (t.min() < 0 or t.max() >= V):
        raise ValueError(f"{op}: targets must lie in [0, {V}), got range [{t.min().item()}, {t.max().item()}]")


def _per_token(x, name: str, B: int, T: int, device, allow_row: bool = False) -> torch.Tensor | None:
    if x is None:
        return None
    if allow_row and x.shape == (B,):
        x = x[:, None].expand(B, T)
    if x.shape != (B, T):
        raise ValueError(f"{name} must be [{B}, {T}]{' or [B]' if allow_row else ''}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, hidden on {device}")
    return x.detach().float()


def _vocab_offset(weight, group) -> int:
    if group is None:
        return 0
    import torch.distributed as dist

    return dist.get_rank(group) * weight.shape[0]


# ----------------------------------------------------------------------------- fused engine

def _finish_lse(parts: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, entropy, z_target) from combined (m, s, u, z_target) [4, N], merged across `group`'s ranks."""
    if group is not None:
        import torch.distributed as dist

        M = parts[0].clone()
        dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)
        m, s, u, zt = parts
        a = torch.exp(m - M)
        rest = torch.stack([a * s, a * (u + (m - M) * s), zt])
        dist.all_reduce(rest, group=group)
        parts = torch.cat([M[None], rest])
    m, s, u, zt = parts
    log_s = torch.log(s)
    return m + log_s, log_s - u / s, zt


_MM_OUT_DTYPE: dict[str, int] = {}  # device type -> how a bf16 x bf16 -> fp32 product works here


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a @ b; into a wider `out` via torch.mm(out_dtype) where this torch / device has it."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
        return
    mode = _MM_OUT_DTYPE.get(a.device.type, 0)
    if mode == 0:
        try:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[a.device.type] = mode = 1
    out.copy_(torch.mm(a, b))  # fallback: rounded to the input dtype first


def _chunk_rows(N: int, V: int, elem_bytes: int) -> int:
    cap = max(1, CHUNK_BYTES // (V * elem_bytes))
    if N <= cap:
        return N
    n_chunks = -(-N // cap)
    rows = -(-N // n_chunks)
    return min(cap, -(-rows // 64) * 64)


def _chunked_pass(h, w, targets, scale, group, coef_fn, need_gh, need_gw, fp32_logits):
    """(logp, entropy, grad_h, grad_w) for h [N, H]; grads (unscaled by grad_output) when asked."""
    N, V = h.shape[0], w.shape[0]
    vocab_start = _vocab_offset(w, group)
    buf_dtype = torch.float32 if fp32_logits else h.dtype
    C = _chunk_rows(N, V, torch.finfo(buf_dtype).bits // 8)
    buf = torch.empty(C, V, device=h.device, dtype=buf_dtype)
    logp = torch.empty(N, device=h.device, dtype=torch.float32)
    entropy = torch.empty_like(logp)
    gh = torch.empty_like(h) if need_gh else None
    gw = torch.empty_like(w) if need_gw else None
    for start in range(0, N, C):
        end = min(start + C, N)
        hc, tc, x = h[start:end], targets[start:end], buf[: end - start]
        _mm_into(hc, w.t(), x)                                                   # [c, V]
        lse, ent, zt = _finish_lse(tk.row_stats(x, tc, vocab_start, scale), group)
        logp[start:end] = zt - lse
        entropy[start:end] = ent
        if not (need_gh or need_gw):
            continue
        coef = coef_fn(logp[start:end], start, end) * scale
        g = x if x.dtype == h.dtype else x.view(h.dtype)[:, :V]                  # gradient over the logits
        tk.row_grad(x, g, tc, lse, coef.contiguous(), vocab_start, scale)
        if need_gh:
            torch.mm(g, w, out=gh[start:end])
        if need_gw:
            if start == 0:
                torch.mm(g.t(), hc, out=gw)
            else:
                gw.addmm_(g.t(), hc)
    if gh is not None and group is not None:
        import torch.distributed as dist

        dist.all_reduce(gh, group=group)
    return logp, entropy, gh, gw


def _tiled_forward(h, w, targets, scale, group):
    parts = tk.tiled_stats(h, w, targets, _vocab_offset(w, group), scale)
    return _finish_lse(tk.combine_parts(parts), group)


class _ChunkedLoss(torch.autograd.Function):
    """(loss, logp, entropy); gradients are computed in forward and only scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, objective, opts):
        scale, group, need_gh, need_gw, fp32_logits = opts
        logp, ent, gh, gw = _chunked_pass(hidden, weight, objective.targets, scale, group, objective.coef,
                                          need_gh, need_gw, fp32_logits)
        ctx.grads = (gh, gw)
        ctx.mark_non_differentiable(logp, ent)
        return objective.value(logp), logp, ent

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_ent):
        if ctx.grads is None:
            raise RuntimeError("grpo_loss / linear_cross_entropy: the gradients were handed out by a first "
                               "backward; a second backward through the same call is not supported")
        gh, gw = ctx.grads
        ctx.grads = None  # hand the buffers to autograd without a copy
        if bool(g_loss != 1):  # one host sync, as in Liger; saves a [V, H] pass in the usual case
            gh = gh * g_loss.to(gh.dtype) if gh is not None else None
            gw = gw.mul_(g_loss.to(gw.dtype)) if gw is not None else None
        return gh, gw, None, None


class _TiledLoss(torch.autograd.Function):
    """(loss, logp, entropy) from the tiled Triton kernels; backward recomputes the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, objective, opts):
        scale, group, need_gh, need_gw, _ = opts
        lse, ent, zt = _tiled_forward(hidden, weight, objective.targets, scale, group)
        logp = zt - lse
        if need_gh or need_gw:
            coef = objective.coef(logp, 0, logp.shape[0])
            ctx.save_for_backward(hidden, weight, objective.targets, lse, coef)
            ctx.opts = opts
        ctx.mark_non_differentiable(logp, ent)
        return objective.value(logp), logp, ent

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_ent):
        hidden, weight, targets, lse, coef = ctx.saved_tensors
        scale, group, need_gh, need_gw, _ = ctx.opts
        coef = (coef * (g_loss * scale)).contiguous()  # grad_output folded in: no host sync
        gh, gw = tk.tiled_grad(hidden, weight, targets, lse, coef, _vocab_offset(weight, group), scale)
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(gh, group=group)
        return (gh.to(hidden.dtype) if need_gh else None), (gw.to(weight.dtype) if need_gw else None), None, None


def _run(impl: str, hidden2d, weight, objective, temperature: float, group):
    if impl not in ("chunked", "chunked_fp32", "triton"):
        raise ValueError(f"impl={impl!r}: choose one of {IMPLS}")
    grad = torch.is_grad_enabled()
    opts = (1.0 / temperature, group, grad and hidden2d.requires_grad, grad and weight.requires_grad,
            impl == "chunked_fp32")
    fn = _TiledLoss if impl == "triton" else _ChunkedLoss
    return fn.apply(hidden2d.contiguous(), weight.contiguous(), objective, opts)


class _GRPOObjective:
    """Per-token inputs flattened to [N] fp32; coef(logp, start, end) = dloss/dlogp for tokens start:end."""

    def __init__(self, targets, mask, adv, old, ref, is_w, cfg: PolicyLossConfig):
        flat = lambda x: None if x is None else x.reshape(-1).contiguous()  # noqa: E731
        self.targets, self.cfg = targets.reshape(-1).contiguous(), cfg
        self.mask, self.adv, self.old, self.ref, self.is_w = map(flat, (mask, adv, old, ref, is_w))
        self.weight = flat(_agg_weights(mask, cfg))

    def _slice(self, start, end):
        return [None if x is None else x[start:end] for x in (self.adv, self.old, self.ref, self.is_w)]

    def coef(self, logp, start, end):
        return self.weight[start:end] * _dloss_dlogp(logp, *self._slice(start, end), self.cfg)

    def value(self, logp):
        return (self.weight * policy_terms(logp, self.adv, self.old, self.ref, self.is_w, self.cfg)[0]).sum()

    def stats(self, logp):
        _, ratio, kl = policy_terms(logp, self.adv, self.old, self.ref, self.is_w, self.cfg)
        return _policy_stats(ratio, kl, self.adv, self.mask, self.cfg)


class _CEObjective:
    def __init__(self, targets, ignore_index: int, reduction: str):
        self.targets = targets.contiguous()
        valid = (targets != ignore_index).float()
        n = valid.sum()
        self.weight = valid / torch.where(n > 0, n, 1) if reduction == "mean" else valid

    def coef(self, logp, start, end):
        return -self.weight[start:end]

    def value(self, logp):
        return -(self.weight * logp).sum()


# ----------------------------------------------------------------------------- public API

def grpo_loss(hidden, weight, targets, mask, advantages, old_logprobs=None, ref_logprobs=None, *, beta=0.0,
              eps_low=0.2, eps_high=0.2, dual_clip=None, temperature=1.0, agg="seq_mean_token_mean",
              norm_len=None, is_weights=None, vocab_group=None, impl=DEFAULT_IMPL):
    """GRPO loss from hidden [B, T, H] and the head weight [V, H] (or its vocab shard); see the module doc.

    Returns (loss, stats): stats holds detached per-token `logprobs`, `entropy` [B, T] (of the
    temperature-scaled distribution) and masked means `clip_frac_low`, `clip_frac_high`, `kl`, `ratio`.
    """
    if impl == "ref":
        return grpo_loss_ref(hidden, weight, targets, mask, advantages, old_logprobs, ref_logprobs, beta=beta,
                             eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip, temperature=temperature,
                             agg=agg, norm_len=norm_len, is_weights=is_weights, vocab_group=vocab_group)
    cfg = PolicyLossConfig(beta, eps_low, eps_high, dual_clip, temperature, agg, norm_len)
    _check_head(hidden, weight, targets, "grpo_loss", 3)
    B, T, H = hidden.shape
    inputs = _grpo_inputs(mask, advantages, old_logprobs, ref_logprobs, is_weights, B, T, hidden.device)
    _check_targets_cpu(targets, weight.shape[0] * _group_size(vocab_group), "grpo_loss")
    objective = _GRPOObjective(targets, *inputs, cfg)
    loss, logp, ent = _run(impl, hidden.reshape(B * T, H), weight, objective, temperature, vocab_group)
    stats = {"logprobs": logp.view(B, T), "entropy": ent.view(B, T), **objective.stats(logp)}
    return loss, stats


def token_logprobs(hidden, weight, targets, temperature=1.0, vocab_group=None, impl=DEFAULT_IMPL):
    """(logprobs, entropy) fp32 with targets' shape, for old-policy / reference passes: no autograd graph."""
    _check_head(hidden, weight, targets, "token_logprobs", hidden.dim())
    PolicyLossConfig(temperature=temperature)
    _check_targets_cpu(targets, weight.shape[0] * _group_size(vocab_group), "token_logprobs")
    h = hidden.detach().reshape(-1, hidden.shape[-1]).contiguous()
    t = targets.reshape(-1).contiguous()
    with torch.no_grad():
        if impl == "ref":
            logp_all = torch.log_softmax(_ref_logits(h, weight.detach(), vocab_group).float() / temperature, -1)
            logp, ent = logp_all.gather(-1, t[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)
        elif impl == "triton":
            lse, ent, zt = _tiled_forward(h, weight.detach().contiguous(), t, 1.0 / temperature, vocab_group)
            logp = zt - lse
        elif impl in ("chunked", "chunked_fp32"):
            logp, ent, _, _ = _chunked_pass(h, weight.detach().contiguous(), t, 1.0 / temperature, vocab_group,
                                            None, False, False, impl == "chunked_fp32")
        else:
            raise ValueError(f"impl={impl!r}: choose one of {IMPLS}")
    return logp.view(targets.shape), ent.view(targets.shape)


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="sum", vocab_group=None,
                         impl=DEFAULT_IMPL):
    """Cross-entropy of hidden [N, H] . weight^T against targets [N], logits never stored.

    reduction "sum" (the model's `ce_sum`) or "mean" over non-ignored targets (0 when all are ignored).
    """
    if impl == "ref":
        return linear_cross_entropy_ref(hidden, weight, targets, ignore_index, reduction, vocab_group)
    _check_ce(hidden, weight, targets, ignore_index, reduction, vocab_group)
    objective = _CEObjective(targets, ignore_index, reduction)
    return _run(impl, hidden, weight, objective, 1.0, vocab_group)[0]


def _check_ce(hidden, weight, targets, ignore_index, reduction, group) -> None:
    _check_head(hidden, weight, targets, "linear_cross_entropy", 2)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r}, choose 'sum' or 'mean'")
    _check_targets_cpu(targets, weight.shape[0] * _group_size(group), "linear_cross_entropy", ignore_index)


def _grpo_inputs(mask, advantages, old, ref, is_w, B, T, device):
    if mask is None or advantages is None:
        raise ValueError("grpo_loss: mask and advantages are required")
    return (_per_token(mask, "mask", B, T, device), _per_token(advantages, "advantages", B, T, device, True),
            _per_token(old, "old_logprobs", B, T, device), _per_token(ref, "ref_logprobs", B, T, device),
            _per_token(is_w, "is_weights", B, T, device))


def _group_size(group) -> int:
    if group is None:
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group)


# ----------------------------------------------------------------------------- references

class _CopyToGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (every rank used the same input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        import torch.distributed as dist

        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _GatherVocab(torch.autograd.Function):
    """All-gather vocab shards along the last dim; each rank's identical loss sends back its own slice."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.rank, ctx.width = dist.get_rank(group), x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return g[..., ctx.rank * ctx.width:(ctx.rank + 1) * ctx.width], None


def _ref_logits(hidden, weight, group):
    """Full-vocabulary logits in the input dtype (the naive bf16 baseline rounds them, as here)."""
    if group is None:
        return F.linear(hidden, weight)
    return _GatherVocab.apply(F.linear(_CopyToGroup.apply(hidden, group), weight), group)


def _aggregate_ref(loss_tok, mask, cfg: PolicyLossConfig):
    total = (mask * loss_tok).sum()
    if cfg.agg == "token_mean":
        return total / mask.sum() if mask.sum() > 0 else total * 0
    if cfg.agg == "seq_mean_token_sum_norm":
        return total / (mask.shape[0] * (cfg.norm_len or mask.shape[1]))
    lens = mask.sum(1)
    keep = lens > 0
    if not keep.any():
        return total * 0
    return ((mask * loss_tok).sum(1)[keep] / lens[keep]).mean()


def grpo_loss_ref(hidden, weight, targets, mask, advantages, old_logprobs=None, ref_logprobs=None, *, beta=0.0,
                  eps_low=0.2, eps_high=0.2, dual_clip=None, temperature=1.0, agg="seq_mean_token_mean",
                  norm_len=None, is_weights=None, vocab_group=None, impl="ref"):
    """Readable PyTorch GRPO loss: materialized logits, autograd. Same contract as `grpo_loss`."""
    cfg = PolicyLossConfig(beta, eps_low, eps_high, dual_clip, temperature, agg, norm_len)
    _check_head(hidden, weight, targets, "grpo_loss_ref", 3)
    B, T, _ = hidden.shape
    mask, adv, old, ref, is_w = _grpo_inputs(mask, advantages, old_logprobs, ref_logprobs, is_weights, B, T,
                                             hidden.device)
    logits = _ref_logits(hidden, weight, vocab_group)
    logp_all = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, -1)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    loss_tok, ratio, kl = policy_terms(logp, adv, old, ref, is_w, cfg)
    stats = {"logprobs": logp.detach(), "entropy": -(logp_all.exp() * logp_all).sum(-1).detach(),
             **_policy_stats(ratio.detach(), None if kl is None else kl.detach(), adv, mask, cfg)}
    return _aggregate_ref(loss_tok, mask, cfg), stats


def linear_cross_entropy_ref(hidden, weight, targets, ignore_index=-100, reduction="sum", vocab_group=None,
                             impl="ref"):
    """F.cross_entropy on materialized fp32 logits; "mean" of no valid target is 0 (not NaN)."""
    _check_ce(hidden, weight, targets, ignore_index, reduction, vocab_group)
    logits = _ref_logits(hidden, weight, vocab_group).float()
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)


class _CallableModule(types.ModuleType):
    """`r1core.kernels.grpo_loss` names both this module and its function. Importing the submodule makes
    Python set the package attribute to the module, whatever kernels/__init__.py exports, so the module
    forwards calls to the function: `r1core.kernels.grpo_loss(...)` works in any import order."""

    def __call__(self, *args, **kwargs):
        return grpo_loss(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
