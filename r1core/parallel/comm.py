"""Differentiable collectives for tensor / sequence parallel regions, on gloo (CPU) and NCCL alike.

copy_to / reduce_from are megatron-core's TP mappings (they run anywhere). megatron's sequence-
parallel mappings allocate on `torch.cuda.current_device()` and split dim 0 (its [s, b, h]
layout), and torch's autograd collectives do not serve either: torch.distributed.nn.functional
is deprecated and its all_gather backward fails on gloo subgroups (it passes a group rank as a
global one), and the _functional_collectives autograd variants hang on gloo (checked with torch
2.13). So the four sequence-parallel ops for our batch-first [B, T, D] tensors (split along T)
are small autograd functions over plain all_gather / reduce_scatter here. Expert parallelism's
variable-split all-to-all is torch.distributed.nn.functional.all_to_all_single (works on both).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)


def broadcast_from_rank0(obj):
    """Rank 0's picklable `obj` on every rank; the identity without torch.distributed or with one rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_on_rank0(fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0 only, its picklable result on every rank: rank 0 generates (rollouts,
    teacher samples) with its whole-model copy and every rank trains on what it made. One rank: the call."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn(*args, **kwargs)
    return broadcast_from_rank0(fn(*args, **kwargs) if dist.get_rank() == 0 else None)


def _gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    parts = [p.contiguous() for p in x.chunk(dist.get_world_size(group), dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def _slice(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    return x.chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)].contiguous()


def _collective(name: str, fwd, bwd):
    """An autograd Function running fwd(x, group, dim) forward and bwd(grad, group, dim) backward."""

    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return fwd(x, group, dim)

    def backward(ctx, g):
        return bwd(g, ctx.group, ctx.dim), None, None

    return type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward)},
    )


_GatherSeq = _collective("_GatherSeq", _gather, _reduce_scatter)
_ReduceScatterSeq = _collective("_ReduceScatterSeq", _reduce_scatter, _gather)
_GatherSliceGrad = _collective("_GatherSliceGrad", _gather, _slice)
_SliceGatherGrad = _collective("_SliceGatherGrad", _slice, _gather)


def copy_to(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient (the input of a column-parallel region)."""
    return copy_to_tensor_model_parallel_region(x, group=group)


def reduce_from(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward; identity backward (the output of a row-parallel region)."""
    return reduce_from_tensor_model_parallel_region(x, group=group)


def gather_seq(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """All-gather sequence shards; backward reduce-scatters (the region after it is tensor-parallel)."""
    return _GatherSeq.apply(x, group, dim)


def reduce_scatter_seq(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Sum partial results over the group and keep this rank's sequence shard; backward all-gathers."""
    return _ReduceScatterSeq.apply(x, group, dim)


def gather_seq_replicated(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """All-gather sequence shards into a region every TP rank computes in full (full gradients on
    every rank), so the backward keeps this rank's slice instead of summing."""
    return _GatherSliceGrad.apply(x, group, dim)


def split_seq(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Keep this rank's sequence shard of a tensor replicated over the group; backward all-gathers."""
    return _SliceGatherGrad.apply(x, group, dim)


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Variable-split all-to-all of rows with autograd (backward runs the transposed exchange)."""
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    return dist_fn.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
