"""`parallelize(model, topo)`: pipeline split, then tensor, expert and context parallelism, in place.

The order follows torchtitan (PP outside, then TP, then EP, then CP): a rank first drops the layers
its pipeline stages do not hold, so it never shards weights it will not keep. Context parallelism
changes no weight: the engine cuts each microbatch's sequences (r1core.parallel.context) and the
balance losses count routing over whole sequences. Data parallelism is the engine's (gradient
reduction and ZeRO-1 in r1core.parallel.optim).
"""

from __future__ import annotations

from r1core.model.moe import moe_ops
from r1core.model.transformer import Transformer

from .context import apply_context_parallel
from .expert import apply_expert_parallel
from .layout import ParamLayout
from .pipeline import keep_stages_, rank_stages
from .tensor import apply_tensor_parallel, tp_layouts
from .topology import Topology


def parallelize(model: Transformer, topo: Topology) -> dict[str, ParamLayout]:
    """Shard a full, initialized model for this rank; returns the layout of every parameter it keeps."""
    cfg = topo.cfg
    layouts = tp_layouts(model, cfg.sequence_parallel)
    stages = rank_stages(topo.rank_in("pp"), cfg)
    if cfg.pp > 1:
        keep_stages_(model, stages, cfg.n_stages)
    if cfg.tp > 1:
        apply_tensor_parallel(model, topo, cfg.sequence_parallel)
    if cfg.tp > 1 or cfg.ep > 1:
        apply_expert_parallel(model, topo)
    if cfg.cp > 1:
        apply_context_parallel(model, topo)
    kept = {}
    for name, _ in model.named_parameters():
        lay = layouts[name]
        if name == "embed.weight" and 0 not in stages:
            lay = ParamLayout(tp_dim=lay.tp_dim, stage_copy=True)
        kept[name] = lay
    return kept


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block in backward (non-reentrant torch.utils.checkpoint); names stay unchanged.

    A recomputed MoE forward counts its tokens into the expert load again; every load doubles
    alike, so the sign-based bias update is unchanged.
    """
    import functools

    from torch.utils.checkpoint import checkpoint

    blocks = list(model.layers.values()) + [m.block for m in model.mtp]
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_compile(model: Transformer) -> None:
    """torch.compile each block in place (Module.compile keeps parameter names); graph breaks are allowed
    where routing needs host values (expert-parallel splits, the reference expert loop)."""
    # Load the MoE kernels now: a lazily registered loader first resolved inside a traced block changes the
    # registry dynamo guards on, and the block would be compiled twice.
    for moe in model.moe_layers():
        moe_ops(moe.impl)
    for block in list(model.layers.values()) + [m.block for m in model.mtp]:
        block.compile()
