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
`dloss_dlogp`) the gradient w.r.t. the raw logits is  c_t / temperature * (onehot(target_t) - p_t):
one scalar per token drives the whole vocabulary row. Cross-entropy is the case c_t = -valid_t / n.

Implementations (`impl`):
- "chunked" (default): token chunks of C rows; per chunk cuBLAS writes logits [C, V] in the input
  dtype, a Triton row kernel sweeps each row twice (online log-sum-exp / entropy / target logit, then
  the gradient written over the logits in place), and cuBLAS finishes grad_h = G W and grad_W += G^T h.
  The loss is a scalar, so all gradients are computed during the forward and scaled by grad_output in
  backward (Liger's trick): logits are computed once, 6NHV FLOPs, the floor (logits, grad_h, grad_W),
  all in cuBLAS. A tile kernel that recomputes logits in backward needs 8NHV and cannot get within
  1.15x of the 6NHV roofline. Beyond the GEMMs the Triton passes move ~6 bytes per logit (two bf16
  reads, one write). bf16 logits round exactly as the naive bf16 baseline does (so the tolerance rule
  holds by construction), halve that traffic against fp32 and double the rows per chunk. C keeps the
  buffer under CHUNK_BYTES (768 MiB: C = 2048 at V = 151936 bf16); fewer, larger chunks matter because
  each chunk re-reads and re-writes grad_W ([V, H]; bf16 accumulation in cuBLAS's addmm, as Liger does).
- "chunked_fp32": the same with fp32 logits (torch.mm out_dtype) and a separate bf16 gradient buffer.
  Log-probs carry no bf16 logit rounding, for 4 more bytes read per logit and fewer rows per chunk.
- "triton": pure Triton tiles (tl.dot), logits never stored, not even per chunk; the backward recomputes
  them (8NHV) and accumulates grad_W / grad_h in fp32 buffers. A fallback, not a speed path.
- "ref": `grpo_loss_ref` (materialized [N, V] logits, autograd).
Vocab parallel (`vocab_group`): `weight` is this rank's rows [r V/tp, (r+1) V/tp); the per-token
(max, sum-exp, entropy, target logit) partials are all-reduced, and so (sum) is grad_h, each rank
holding only its vocabulary's share of it; grad_W stays per shard.

References: Shao et al. 2024 (DeepSeekMath, GRPO); Yu et al. 2025 (DAPO, token_mean, clip-higher);
Liu et al. 2025 (Dr. GRPO); Milakov & Gimelshein 2018 (online softmax); Wijmans et al. 2024 (Cut Your
Losses, tiled CE); Liger-Kernel fused linear CE (gradients in the forward).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from . import _grpo_loss_triton as tk
from .grpo_loss_terms import AGGS, LossAgg  # noqa: F401  (re-exported: the aggregation names)
from .grpo_loss_terms import (
    CETerms,
    PolicyLossConfig,
    PolicyLossTerms,
    check_head,
    check_scaling,
    check_targets_cpu,
    grpo_inputs,
    group_size,
    neutralize_unmasked,
    policy_stats,
    policy_terms,
    vocab_offset,
)

IMPLS = ("chunked", "chunked_fp32", "triton", "ref")
DEFAULT_IMPL = "chunked"
CHUNK_BYTES = 768 << 20  # per-chunk logits buffer budget of the chunked paths


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


_NO_MM_OUT_DTYPE: set[str] = set()  # device types whose torch.mm lacks out_dtype (CPU; older torch)


def _mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out = a @ b; into a wider `out` via torch.mm(out_dtype), else through a rounded product."""
    if out.dtype != a.dtype and a.device.type not in _NO_MM_OUT_DTYPE:
        try:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _NO_MM_OUT_DTYPE.add(a.device.type)
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a, b))


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
    vocab_start = vocab_offset(w, group)
    buf_dtype = torch.float32 if fp32_logits else h.dtype
    C = _chunk_rows(N, V, torch.finfo(buf_dtype).bits // 8)
    buf = torch.empty(C, V, device=h.device, dtype=buf_dtype)
    # fp32 logits get their own bf16 gradient buffer: writing it in place over the logits raced on the GPU
    # (the narrow writes of one tile land on logits of earlier tiles that other warps may still read).
    gbuf = (
        torch.empty(C, V, device=h.device, dtype=h.dtype)
        if buf_dtype != h.dtype and (need_gh or need_gw)
        else None
    )
    logp = torch.empty(N, device=h.device, dtype=torch.float32)
    entropy = torch.empty_like(logp)
    gh = torch.empty_like(h) if need_gh else None
    gw = torch.empty_like(w) if need_gw else None
    for start in range(0, N, C):
        end = min(start + C, N)
        hc, tc, x = h[start:end], targets[start:end], buf[: end - start]
        _mm_into(hc, w.t(), x)  # [c, V]
        lse, ent, zt = _finish_lse(tk.row_stats(x, tc, vocab_start, scale), group)
        logp[start:end] = zt - lse
        entropy[start:end] = ent
        if not (need_gh or need_gw):
            continue
        coef = coef_fn(logp[start:end], start, end) * scale
        g = x if gbuf is None else gbuf[: end - start]  # gradient over the logits
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
    parts = tk.tiled_stats(h, w, targets, vocab_offset(w, group), scale)
    return _finish_lse(tk.combine_parts(parts), group)


class _ChunkedLoss(torch.autograd.Function):
    """(loss, logp, entropy); gradients are computed in forward and only scaled in backward.

    The backward may run more than once: zero-bubble pipeline schedules (DualPipeV) run the last
    stage's loss node in the input pass (for grad_h) and again in the weight pass (for grad_w;
    torch.distributed.pipelining's stage_backward_input / stage_backward_weight). So the buffers
    are saved tensors, which autograd frees after the last backward that does not retain the graph,
    and they are scaled out of place.
    """

    @staticmethod
    def forward(ctx, hidden, weight, objective, opts):
        scale, group, need_gh, need_gw, fp32_logits = opts
        logp, ent, gh, gw = _chunked_pass(
            hidden, weight, objective.targets, scale, group, objective.coef, need_gh, need_gw, fp32_logits
        )
        ctx.save_for_backward(gh, gw)
        ctx.mark_non_differentiable(logp, ent)
        return objective.value(logp), logp, ent

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_ent):
        gh, gw = ctx.saved_tensors
        # one host sync, as in Liger, saves a [V, H] pass in the usual case; inside a CUDA graph capture
        # (parallel.cuda_graph) nothing may wait on the host, so the scale is always applied (x * 1 is exact)
        if (g_loss.is_cuda and torch.cuda.is_current_stream_capturing()) or bool(g_loss != 1):
            gh = gh * g_loss.to(gh.dtype) if gh is not None else None
            gw = gw * g_loss.to(gw.dtype) if gw is not None else None
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
        gh, gw = tk.tiled_grad(hidden, weight, targets, lse, coef, vocab_offset(weight, group), scale)
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(gh, group=group)
        return (
            (gh.to(hidden.dtype) if need_gh else None),
            (gw.to(weight.dtype) if need_gw else None),
            None,
            None,
        )


def _run(impl: str, hidden2d, weight, objective, temperature: float, group):
    if impl not in ("chunked", "chunked_fp32", "triton"):
        raise ValueError(f"impl={impl!r}: choose one of {IMPLS}")
    grad = torch.is_grad_enabled()
    opts = (
        1.0 / temperature,
        group,
        grad and hidden2d.requires_grad,
        grad and weight.requires_grad,
        impl == "chunked_fp32",
    )
    fn = _TiledLoss if impl == "triton" else _ChunkedLoss
    return fn.apply(hidden2d.contiguous(), weight.contiguous(), objective, opts)


# ----------------------------------------------------------------------------- public API


def _settings(loss: PolicyLossConfig | None, settings: dict) -> PolicyLossConfig:
    if loss is not None and settings:
        raise ValueError(
            f"grpo_loss: pass the settings as `loss` or as keywords, not both ({sorted(settings)})"
        )
    return loss if loss is not None else PolicyLossConfig(**settings)


def grpo_loss(
    hidden,
    weight,
    targets,
    mask,
    advantages,
    old_logprobs=None,
    ref_logprobs=None,
    *,
    loss: PolicyLossConfig | None = None,
    temperature=1.0,
    norm_len=None,
    is_weights=None,
    vocab_group=None,
    impl=DEFAULT_IMPL,
    **settings,
):
    """GRPO loss from hidden [B, T, H] and the head weight [V, H] (or its vocab shard); see the module doc.

    `loss` holds the settings (clip range, KL weight, aggregation); PolicyLossConfig's fields given as
    keywords (`eps_high=0.2`) build one instead. `temperature` is the sampler's and `norm_len` the
    Dr. GRPO normalizer (the response cap; None: T).
    Returns (loss, stats): stats holds detached per-token `logprobs`, `entropy` [B, T] (of the
    temperature-scaled distribution) and masked means `clip_frac_low`, `clip_frac_high`, `kl`, `ratio`.
    """
    cfg = _settings(loss, settings)
    if impl == "ref":
        return grpo_loss_ref(
            hidden,
            weight,
            targets,
            mask,
            advantages,
            old_logprobs,
            ref_logprobs,
            loss=cfg,
            temperature=temperature,
            norm_len=norm_len,
            is_weights=is_weights,
            vocab_group=vocab_group,
        )
    check_scaling(temperature, norm_len)
    check_head(hidden, weight, targets, "grpo_loss", 3)
    B, T, H = hidden.shape
    inputs = grpo_inputs(mask, advantages, old_logprobs, ref_logprobs, is_weights, B, T, hidden.device)
    check_targets_cpu(targets, weight.shape[0] * group_size(vocab_group), "grpo_loss")
    terms = PolicyLossTerms(targets, *inputs, cfg, norm_len)
    value, logp, ent = _run(impl, hidden.reshape(B * T, H), weight, terms, temperature, vocab_group)
    stats = {"logprobs": logp.view(B, T), "entropy": ent.view(B, T), **terms.stats(logp)}
    return value, stats


def token_logprobs(hidden, weight, targets, temperature=1.0, vocab_group=None, impl=DEFAULT_IMPL):
    """(logprobs, entropy) fp32 with targets' shape, for old-policy / reference passes: no autograd graph."""
    check_head(hidden, weight, targets, "token_logprobs", hidden.dim())
    check_scaling(temperature, None)
    check_targets_cpu(targets, weight.shape[0] * group_size(vocab_group), "token_logprobs")
    h = hidden.detach().reshape(-1, hidden.shape[-1]).contiguous()
    t = targets.reshape(-1).contiguous()
    with torch.no_grad():
        if impl == "ref":
            logp_all = torch.log_softmax(
                _ref_logits(h, weight.detach(), vocab_group).float() / temperature, -1
            )
            logp, ent = logp_all.gather(-1, t[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)
        elif impl == "triton":
            lse, ent, zt = _tiled_forward(h, weight.detach().contiguous(), t, 1.0 / temperature, vocab_group)
            logp = zt - lse
        elif impl in ("chunked", "chunked_fp32"):
            logp, ent, _, _ = _chunked_pass(
                h,
                weight.detach().contiguous(),
                t,
                1.0 / temperature,
                vocab_group,
                None,
                False,
                False,
                impl == "chunked_fp32",
            )
        else:
            raise ValueError(f"impl={impl!r}: choose one of {IMPLS}")
    return logp.view(targets.shape), ent.view(targets.shape)


def linear_cross_entropy(
    hidden, weight, targets, ignore_index=-100, reduction="sum", vocab_group=None, impl=DEFAULT_IMPL
):
    """Cross-entropy of hidden [N, H] . weight^T against targets [N], logits never stored.

    reduction "sum" (the model's `ce_sum`) or "mean" over non-ignored targets (0 when all are ignored).
    """
    if impl == "ref":
        return linear_cross_entropy_ref(hidden, weight, targets, ignore_index, reduction, vocab_group)
    _check_ce(hidden, weight, targets, ignore_index, reduction, vocab_group)
    terms = CETerms(targets, ignore_index, reduction)
    return _run(impl, hidden, weight, terms, 1.0, vocab_group)[0]


def _check_ce(hidden, weight, targets, ignore_index, reduction, group) -> None:
    check_head(hidden, weight, targets, "linear_cross_entropy", 2)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r}, choose 'sum' or 'mean'")
    check_targets_cpu(targets, weight.shape[0] * group_size(group), "linear_cross_entropy", ignore_index)


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
        return g[..., ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width], None


def _ref_logits(hidden, weight, group):
    """Full-vocabulary logits in the input dtype (the naive bf16 baseline rounds them, as here)."""
    if group is None:
        return F.linear(hidden, weight)
    return _GatherVocab.apply(F.linear(_CopyToGroup.apply(hidden, group), weight), group)


def _aggregate_ref(loss_tok, mask, cfg: PolicyLossConfig, norm_len: int | None):
    total = (mask * loss_tok).sum()
    if cfg.agg == "token_mean":
        return total / mask.sum() if mask.sum() > 0 else total * 0
    if cfg.agg == "seq_mean_token_sum_norm":
        return total / (mask.shape[0] * (norm_len or mask.shape[1]))
    lens = mask.sum(1)
    keep = lens > 0
    if not keep.any():
        return total * 0
    return ((mask * loss_tok).sum(1)[keep] / lens[keep]).mean()


def grpo_loss_ref(
    hidden,
    weight,
    targets,
    mask,
    advantages,
    old_logprobs=None,
    ref_logprobs=None,
    *,
    loss: PolicyLossConfig | None = None,
    temperature=1.0,
    norm_len=None,
    is_weights=None,
    vocab_group=None,
    impl="ref",
    **settings,
):
    """Readable PyTorch GRPO loss: materialized logits, autograd. Same contract as `grpo_loss`."""
    cfg = _settings(loss, settings)
    check_scaling(temperature, norm_len)
    check_head(hidden, weight, targets, "grpo_loss_ref", 3)
    B, T, _ = hidden.shape
    mask, adv, old, ref, is_w = grpo_inputs(
        mask, advantages, old_logprobs, ref_logprobs, is_weights, B, T, hidden.device
    )
    logits = _ref_logits(hidden, weight, vocab_group)
    logp_all = torch.log_softmax(
        logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, -1
    )
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    loss_tok, ratio, kl = policy_terms(logp, adv, *neutralize_unmasked(logp, mask, old, ref, is_w), cfg)
    with torch.no_grad():  # a detached stat: no graph over two more [B, T, V] tensors
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    stats = {
        "logprobs": logp.detach(),
        "entropy": entropy,
        **policy_stats(ratio.detach(), None if kl is None else kl.detach(), adv, mask, cfg),
    }
    return _aggregate_ref(loss_tok, mask, cfg, norm_len), stats


def linear_cross_entropy_ref(
    hidden, weight, targets, ignore_index=-100, reduction="sum", vocab_group=None, impl="ref"
):
    """F.cross_entropy on materialized fp32 logits; "mean" of no valid target is 0 (not NaN)."""
    _check_ce(hidden, weight, targets, ignore_index, reduction, vocab_group)
    logits = _ref_logits(hidden, weight, vocab_group).float()
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)
