"""Data parallelism: gradient reduction, the global gradient norm and ZeRO-1 optimizers.

Why ZeRO-1 with torch's `ZeroRedundancyOptimizer` rather than FSDP2: parameters stay plain
whole-shard tensors, so the TP hooks, the EP dispatcher, the pipeline stages and the model's
own code (which reshapes weights, e.g. MLA's absorbed path) run unchanged; it needs only
broadcast, which gloo has; and optimizer state (2/3 of the memory of fp32 AdamW training) is
what ZeRO-1 removes. Dense and expert parameters are replicated over different groups (dp and
dp/ep), so each gets its own ZeroRedundancyOptimizer.

Gradients are reduced once per step, after all microbatches (the loss is already normalized by
global token counts, so the reduction is a sum): one flat all-reduce per group and bucket. torch
DDP would reduce per backward call and knows one group per module, which fits neither the
pipeline schedules' many backward calls nor the experts' separate group.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .layout import ParamLayout, counts_in_norm

BUCKET_ELEMS = 1 << 27


def _all_reduce_flat(tensors: list[torch.Tensor], group) -> None:
    """All-reduce (sum) in place through flat buckets of at most BUCKET_ELEMS (one tensor may exceed it)."""
    start = 0
    while start < len(tensors):
        end, size = start, 0
        while end < len(tensors) and (end == start or size + tensors[end].numel() <= BUCKET_ELEMS):
            size += tensors[end].numel()
            end += 1
        bucket = tensors[start:end]
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            dst.copy_(src)
        start = end


def reduce_gradients(named_params, layouts: dict[str, ParamLayout], topo, embed_group=None) -> None:
    """Sum gradients over the ranks that hold the same shard (and over TP for partial ones).

    Context-parallel ranks hold the same shard and see different tokens: for gradients they are data
    parallel, so dense gradients are summed over dp x cp (each rank's loss is its tokens' share)."""
    by_group: dict[str, list[torch.Tensor]] = {"dp_cp": [], "edp": [], "tp_dp": []}
    shared = []
    for name, p in named_params:
        lay = layouts[name]
        key = "edp" if lay.is_expert else ("tp_dp" if lay.tp_partial else "dp_cp")
        by_group[key].append(p.grad)
        if name == "embed.weight" and embed_group is not None:
            shared.append(p.grad)
    sizes = {"dp_cp": topo.dp * topo.cp, "edp": topo.edp, "tp_dp": topo.tp * topo.dp * topo.cp}
    for key, grads in by_group.items():
        if grads and sizes[key] > 1:
            _all_reduce_flat(grads, getattr(topo, f"{key}_group"))
    if shared:
        _all_reduce_flat(shared, embed_group)


def global_grad_norm(
    named_params, layouts: dict[str, ParamLayout], topo, triton: bool = False
) -> torch.Tensor:
    """L2 norm of the whole model's gradient, each distinct shard counted once (fp32)."""
    ranks = {"tp": topo.rank_in("tp"), "dp": topo.rank_in("dp_cp"), "edp": topo.rank_in("edp")}
    sq = grad_norm_sq(
        [p.grad for name, p in named_params if counts_in_norm(layouts[name], ranks)], topo.device, triton
    )
    dist.all_reduce(sq)
    return sq.sqrt()


def grad_norm_sq(grads: list[torch.Tensor], device, triton: bool = False) -> torch.Tensor:
    """Sum of squares of the gradients, accumulated in fp32 whatever their dtype. `triton` (with
    optim.implementation=triton): one multi-tensor Triton pass per dtype (r1core.kernels.adamw's
    `sum_of_squares`) rather than torch's `_foreach_norm`, which reads them at about 70 % of the copy
    bandwidth."""
    if not grads:
        return torch.zeros((), device=device, dtype=torch.float32)
    if triton:
        from r1core.kernels.adamw import sum_of_squares

        return sum_of_squares(grads)
    return torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).square().sum()


def clip_(params: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    if max_norm and max_norm > 0 and math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)


def folds_clip(opt) -> bool:
    """Whether `opt` can apply the clip factor inside its own update: torch's fused Adam/AdamW divide every
    gradient by a device scalar `grad_scale` (GradScaler's unscale hook) in the same kernel, and store the
    divided gradient back. ZeRO wraps an optimizer and steps it itself; its wrapper is left to clip_."""
    return isinstance(opt, torch.optim.Adam | torch.optim.AdamW) and bool(opt.defaults.get("fused"))


def clip_and_step_(
    optimizers: list,
    params: list[torch.Tensor],
    max_norm: float,
    total_norm: torch.Tensor,
    found_inf: torch.Tensor | None = None,
):
    """Scale the gradients by min(1, max_norm / (total_norm + 1e-6)) (torch's clip_grad_norm_) and step.

    A fused AdamW takes the inverse factor as its `grad_scale`, so clipping costs no pass of its own (a read
    and a write of every gradient, about a tenth of the optimizer's traffic); the gradients it leaves behind
    are the clipped ones, as after clip_. Any other optimizer gets clip_ first. The update differs from
    clip-then-step only by rounding: the fused kernel divides in fp32, where clip_ first rounds the clipped
    gradient to the parameters' dtype.

    `found_inf` (a float32 device scalar, 1 where the norm is not finite) makes a fused AdamW skip its update
    and keep its step count on the device, as under GradScaler: the skip needs no host sync, so the whole step
    can be one CUDA graph. Only fused optimizers take it."""
    all_fused = all(folds_clip(o) for o in optimizers)
    if found_inf is not None and not all_fused:
        raise ValueError("found_inf needs fused Adam/AdamW optimizers (they skip the update on the device)")
    clipping = bool(max_norm) and max_norm > 0 and math.isfinite(max_norm)
    fold = clipping and all_fused
    if clipping and not fold:
        clip_(params, max_norm, total_norm)
    inverse = torch.clamp((total_norm.float() + 1e-6) / max_norm, min=1.0) if fold else None
    for opt in optimizers:
        if folds_clip(opt):
            opt.grad_scale, opt.found_inf = inverse, found_inf  # read by step(); None: not clipping / no skip
        opt.step()


def param_groups(named_params, weight_decay: float) -> list[dict]:
    """Decay matrices (and stacked experts), not norms: the usual LM recipe (and DeepSeek's)."""
    decay = [p for _, p in named_params if p.ndim >= 2]
    rest = [p for _, p in named_params if p.ndim < 2]
    return [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
        if g["params"]
    ]


def adamw(
    named_params,
    optim_cfg,
    group=None,
    group_size: int = 1,
    zero1: bool = False,
    graphable: bool = False,
    sources: dict | None = None,
):
    """AdamW over `named_params`; its state sharded over `group` (ZeRO-1) when asked and the group has > 1
    rank. `graphable`: fused (on any device) and, on CUDA, capturable, as a CUDA graph of the step needs.

    optim.implementation=triton steps with r1core's kernel (`r1core.kernels.adamw.TritonAdamW`, always
    graphable). `sources` (fp32 master -> model parameter) lets it read the model's gradients and write the
    rounded masters itself; ZeRO steps a shard and broadcasts the masters, so it gets no sources and the
    engine keeps MasterWeights' copies (`fuses_masters`)."""
    groups = param_groups(named_params, optim_cfg.weight_decay)
    kw = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    sharded = zero1 and group_size > 1
    if optim_cfg.implementation == "triton":
        from r1core.kernels.adamw import TritonAdamW

        cls, kw["bf16_moments"] = TritonAdamW, optim_cfg.bf16_moments
        if not sharded:
            kw["sources"] = sources
    else:
        cls = torch.optim.AdamW
        on_cuda = bool(named_params) and named_params[0][1].is_cuda
        if on_cuda or graphable:
            kw["fused"] = True  # one kernel for all of AdamW's per-parameter updates
        if on_cuda and graphable:
            kw["capturable"] = True  # step counts and a tensor learning rate stay on the device
    if sharded:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=cls, process_group=group, **kw)
    return cls(groups, **kw)


def fuses_masters(opt) -> bool:
    """Whether `opt` reads the model's gradients and writes the rounded masters itself (TritonAdamW with
    sources): the engine then skips MasterWeights' copies around the step."""
    return bool(getattr(opt, "sources", None))


def local_optimizer(opt) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state (ZeRO keeps it in `.optim`)."""
    return getattr(opt, "optim", opt)


@torch.no_grad()
def init_adam_state_(opt) -> None:
    """Materialize zero AdamW state for every parameter this rank steps, so a checkpoint can load into it."""
    inner = local_optimizer(opt)
    for group in inner.param_groups:
        on_device = group.get("fused") or group.get("capturable")  # where torch's AdamW keeps `step` then
        for p in group["params"]:
            if inner.state.get(p):
                continue
            if hasattr(inner, "init_state"):  # TritonAdamW: its moments' dtype
                inner.state[p] = inner.init_state(p)
            else:
                inner.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


class MasterWeights:
    """fp32 master copies of low-precision parameters (megatron's "main params"), stepped by the optimizer.

    The model computes in its dtype (bf16); after the gradients are reduced and clipped they are
    copied into fp32 master gradients, AdamW updates the masters, and the masters are rounded back
    into the model. Without them a bf16 weight drops every update smaller than 2^-8 of itself, which
    at RL learning rates (1e-6) is nearly all of them.
    """

    def __init__(self, named_params: list[tuple[str, torch.Tensor]]):
        self.model_params = [p for _, p in named_params]
        self.named = [(n, torch.nn.Parameter(p.detach().float().clone())) for n, p in named_params]

    def sources(self) -> dict:
        """Each master -> its model parameter (what TritonAdamW reads gradients from and rounds into)."""
        return {m: p for (_, m), p in zip(self.named, self.model_params)}

    @torch.no_grad()
    def grads_in(self) -> None:
        for (_, m), p in zip(self.named, self.model_params):
            if m.grad is None:
                m.grad = torch.empty_like(m)
            m.grad.copy_(p.grad)

    @torch.no_grad()
    def weights_out(self) -> None:
        torch._foreach_copy_(self.model_params, [m for _, m in self.named])
