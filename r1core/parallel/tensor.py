"""Tensor (+ sequence) parallelism applied to a built Transformer, in place.

The model stays the single-device spec: weights are replaced by this rank's shard and module
hooks mark where a TP region starts and ends (torchtitan's `parallelize_module`, with megatron's
mappings). Per block:

- MLA: heads split over TP. wq_a / wkv_a and their norms stay whole (the low-rank latents are
  shared by all heads); wq (no q compression) / wq_b and wkv_b are column-split by heads, wo is
  row-split. Every rank computes the replicated projections for its heads only, so their
  gradients are partial sums over TP ranks ("tp_partial": summed over TP after backward).
- Dense MLP and shared experts: w1 / w3 column-split, w2 row-split.
- MoE: the gate runs on every TP rank in full (identical routing, full gradients); the routed
  experts are split over TP inside the dispatcher (r1core.parallel.expert).
- Embedding: megatron-core's VocabParallelEmbedding; output head: vocab rows split, the loss
  runs vocab-parallel (r1core.kernels `vocab_group=`).

Sequence parallel keeps the residual stream split along T ([B, T/tp, D]) between regions: attention
and dense MLPs all-gather on entry and reduce-scatter on exit; MoE layers gather into a region
every rank computes in full (routing and the sequence-wise balance loss see whole sequences) and
slice on exit; norms outside the regions see a shard of the tokens, so their gradients are partial.
MTP blocks stay out of SP: they run on whole sequences of length T - k, which need not divide.
"""

from __future__ import annotations

import torch
from torch import nn

from r1core.model.attention import MLA
from r1core.model.layers import MLP
from r1core.model.moe import MoE
from r1core.model.transformer import Block, Transformer

from . import comm
from .layout import ParamLayout
from .topology import Topology


def _shard(t: torch.Tensor, dim: int, rank: int, n: int) -> torch.Tensor:
    return t.detach().chunk(n, dim=dim)[rank].clone()


def _shard_param_(module: nn.Module, name: str, dim: int, rank: int, n: int) -> None:
    p = getattr(module, name)
    setattr(module, name, nn.Parameter(_shard(p, dim, rank, n), requires_grad=p.requires_grad))


def _shard_linear_(lin: nn.Linear, dim: int, rank: int, n: int) -> None:
    _shard_param_(lin, "weight", dim, rank, n)
    lin.out_features, lin.in_features = lin.weight.shape


def _region(module: nn.Module, enter, leave) -> None:
    """Apply `enter` to the first positional input and `leave` to the output (or its first item)."""
    module.register_forward_pre_hook(lambda m, args: (enter(args[0]), *args[1:]))

    def post(m, args, out):
        return (leave(out[0]), *out[1:]) if isinstance(out, tuple) else leave(out)

    module.register_forward_hook(post)


def _tp_region(module: nn.Module, group, sp: bool) -> None:
    if sp:
        _region(module, lambda x: comm.gather_seq(x, group), lambda y: comm.reduce_scatter_seq(y, group))
    else:
        _region(module, lambda x: comm.copy_to(x, group), lambda y: comm.reduce_from(y, group))


def _parallel_mlp(mlp: MLP, group, rank: int, n: int, sp: bool) -> None:
    _shard_linear_(mlp.w1, 0, rank, n)
    _shard_linear_(mlp.w3, 0, rank, n)
    _shard_linear_(mlp.w2, 1, rank, n)
    _tp_region(mlp, group, sp)


def _parallel_mla(attn: MLA, group, rank: int, n: int, sp: bool) -> None:
    for name in ("wq", "wq_b", "wkv_b"):
        if hasattr(attn, name):
            _shard_linear_(getattr(attn, name), 0, rank, n)
    _shard_linear_(attn.wo, 1, rank, n)
    attn.n_heads //= n
    _tp_region(attn, group, sp)


def _parallel_block(block: Block, topo: Topology, sp: bool) -> None:
    group, rank, n = topo.tp_group, topo.rank_in("tp"), topo.tp
    _parallel_mla(block.attn, group, rank, n, sp)
    if isinstance(block.ffn, MoE):
        if block.ffn.shared_experts is not None:
            _parallel_mlp(block.ffn.shared_experts, group, rank, n, sp=False)
        if sp:
            _region(
                block.ffn, lambda x: comm.gather_seq_replicated(x, group), lambda y: comm.split_seq(y, group)
            )
    else:
        _parallel_mlp(block.ffn, group, rank, n, sp)


def _vocab_parallel_embedding(embed: nn.Embedding, topo: Topology) -> nn.Module:
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import VocabParallelEmbedding

    w = embed.weight
    config = ModelParallelConfig(
        use_cpu_initialization=True, perform_initialization=False, params_dtype=w.dtype
    )
    vpe = VocabParallelEmbedding(
        w.shape[0], w.shape[1], init_method=nn.init.zeros_, config=config, tp_group=topo.tp_group
    )
    vpe.weight = nn.Parameter(_shard(w, 0, topo.rank_in("tp"), topo.tp), requires_grad=w.requires_grad)
    return vpe


def apply_tensor_parallel(model: Transformer, topo: Topology, sequence_parallel: bool) -> None:
    """Shard this rank's part of `model` (after pipeline splitting) over TP in place; see the module
    docstring."""
    group, rank, n = topo.tp_group, topo.rank_in("tp"), topo.tp
    for block in model.layers.values():
        _parallel_block(block, topo, sequence_parallel)
    for mtp in model.mtp:
        _parallel_block(mtp.block, topo, sp=False)
    if model.embed is not None:
        model.embed = _vocab_parallel_embedding(model.embed, topo)
    if model.head is not None:
        _shard_linear_(model.head, 0, rank, n)
    if sequence_parallel and "0" in model.layers:
        # The residual stream leaves the embedding whole (it all-reduces) and is split entering layer 0.
        model.layers["0"].register_forward_pre_hook(
            lambda m, args: (comm.split_seq(args[0], group), *args[1:])
        )


def tp_layouts(model: Transformer, sequence_parallel: bool) -> dict[str, ParamLayout]:
    """How each parameter of a (full, unsharded) model is laid out over TP by `apply_tensor_parallel`."""
    out = {}
    for name, _ in model.named_parameters():
        leaf = name.rsplit(".", 2)
        mod = leaf[-2] if len(leaf) > 1 else ""
        in_mtp = name.startswith("mtp.")
        if ".experts." in name and ".shared_experts." not in name:
            out[name] = ParamLayout(tp_dim=2, ep_dim=0)  # w13 [E, 2, I, D], w2 [E, D, I]: I is dim 2
        elif mod in ("wq", "wq_b", "wkv_b", "w1", "w3") or name in ("embed.weight", "head.weight"):
            out[name] = ParamLayout(tp_dim=0)
        elif mod in ("wo", "w2"):
            out[name] = ParamLayout(tp_dim=1)
        elif mod in ("wq_a", "q_norm", "wkv_a", "kv_norm"):
            out[name] = ParamLayout(tp_partial=True)
        elif sequence_parallel and not in_mtp and mod in ("attn_norm", "ffn_norm", "norm"):
            out[name] = ParamLayout(tp_partial=True)
        else:
            out[name] = ParamLayout()
    return out
