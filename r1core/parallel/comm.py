"""Differentiable collectives for tensor / sequence parallel regions, on gloo (CPU) and NCCL alike.

copy_to / reduce_from are megatron-core's TP mappings (they run anywhere). megatron's sequence-
parallel mappings allocate on `torch.cuda.current_device()` and split dim 0 (its [s, b, h]
layout), so for our batch-first [B, T, D] tensors the sequence-parallel ops below split dim 1:
the all-gather with a reduce-scatter backward and the reduce-scatter are
`torch.distributed.nn.functional`'s; neither library has the two small ones written here
(a gather whose backward only slices, for regions computed redundantly on every TP rank, and
a slice whose backward all-gathers).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)


def copy_to(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient (the input of a column-parallel region)."""
    return copy_to_tensor_model_parallel_region(x, group=group)


def reduce_from(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward; identity backward (the output of a row-parallel region)."""
    return reduce_from_tensor_model_parallel_region(x, group=group)


def gather_seq(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """All-gather sequence shards; backward reduce-scatters (the region after it is tensor-parallel)."""
    return torch.cat(dist_fn.all_gather(x.contiguous(), group=group), dim=dim)


def reduce_scatter_seq(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Sum partial results over the group and keep this rank's sequence shard; backward all-gathers."""
    n = dist.get_world_size(group)
    parts = [p.contiguous() for p in x.chunk(n, dim=dim)]
    return dist_fn.reduce_scatter(torch.empty_like(parts[0]), parts, group=group)


class _GatherSliceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, g):
        n, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return g.chunk(n, dim=ctx.dim)[r].contiguous(), None, None


class _SliceGatherGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        n, r = dist.get_world_size(group), dist.get_rank(group)
        return x.chunk(n, dim=dim)[r].contiguous()

    @staticmethod
    def backward(ctx, g):
        parts = [torch.empty_like(g) for _ in range(dist.get_world_size(ctx.group))]
        dist.all_gather(parts, g.contiguous(), group=ctx.group)
        return torch.cat(parts, dim=ctx.dim), None, None


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
