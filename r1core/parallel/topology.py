"""Process groups for tp, pp, cp, ep, dp from megatron-core's parallel_state.

megatron-core builds the groups (its order "tp-cp-ep-dp-pp": TP ranks adjacent, EP inside DP,
PP outermost); `megatron_kwargs` is the one place our degree names meet megatron's.
`Topology` then carries the groups, sizes and ranks the rest of r1core.parallel needs, so nothing
else reads megatron's module-level state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ParallelConfig


def megatron_kwargs(cfg: ParallelConfig) -> dict:
    """Our tp, pp, cp, ep, dp -> `megatron.core.parallel_state.initialize_model_parallel` arguments.

    megatron-core infers its data-parallel size as world / (tp * pp * cp); experts are split over TP
    as well (expert_tensor_parallel_size = tp), so EP groups stay inside the cp x dp dimensions.
    Virtual pipeline stages are ours (torch.distributed.pipelining), not megatron's.
    """
    return dict(
        tensor_model_parallel_size=cfg.tp,
        pipeline_model_parallel_size=cfg.pp,
        expert_model_parallel_size=cfg.ep,
        expert_tensor_parallel_size=cfg.tp,
        context_parallel_size=cfg.cp,
        order="tp-cp-ep-dp-pp",
        create_gloo_process_groups=False,
    )


@dataclass
class Topology:
    cfg: ParallelConfig  # dp resolved
    rank: int
    world_size: int
    device: torch.device
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    ep_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup  # ranks with the same model shard that read different batches (EP included)
    cp_group: dist.ProcessGroup  # ranks holding pieces of the same sequences (r1core.parallel.context)
    dp_cp_group: dist.ProcessGroup  # dp x cp: replicas of one dense shard that see different tokens
    edp_group: dist.ProcessGroup  # replicas of one expert shard (cp * dp / ep of them)
    tp_dp_group: dist.ProcessGroup  # tp x dp x cp: replicas of TP-replicated parameters
    ep_tp_group: dist.ProcessGroup  # ep x tp: the ranks that split one copy of the routed experts
    embed_group: (
        dist.ProcessGroup | None
    )  # first and last pipeline stage (embedding shared with MTP / tied head)
    pp_ranks: list[int]  # global ranks of this rank's pipeline, by stage rank

    @property
    def tp(self) -> int:
        return self.cfg.tp

    @property
    def pp(self) -> int:
        return self.cfg.pp

    @property
    def ep(self) -> int:
        return self.cfg.ep

    @property
    def cp(self) -> int:
        return self.cfg.cp

    @property
    def dp(self) -> int:
        return self.cfg.dp

    @property
    def edp(self) -> int:
        return self.cfg.cp * self.cfg.dp // self.cfg.ep

    def rank_in(self, name: str) -> int:
        return dist.get_rank(getattr(self, f"{name}_group"))


def init_topology(cfg: ParallelConfig, device: torch.device) -> Topology:
    """Initialize megatron-core's groups for a validated, dp-resolved config (torch.distributed must be
    up)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(**megatron_kwargs(cfg))
    pp_group = ps.get_pipeline_model_parallel_group()
    embed = ps.get_embedding_group() if cfg.pp > 1 else None
    return Topology(
        cfg=cfg,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device=device,
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=pp_group,
        ep_group=ps.get_expert_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        edp_group=ps.get_expert_data_parallel_group(),
        tp_dp_group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True),
        ep_tp_group=ps.get_expert_tensor_and_model_parallel_group(),
        embed_group=embed,
        pp_ranks=dist.get_process_group_ranks(pp_group),
    )
