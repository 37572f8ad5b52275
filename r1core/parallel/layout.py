"""How each parameter is laid out over the ranks, and what follows from it.

One `ParamLayout` per parameter name drives everything that must know about replicas: which
group sums its gradient, which rank counts it in the global gradient norm, and how it is
presented to torch.distributed.checkpoint (a DTensor over the TP / EP mesh) so checkpoints
reshard between layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParamLayout:
    tp_dim: int | None = None  # dim split over TP ranks (None: every TP rank holds it whole)
    ep_dim: int | None = None  # dim split over EP ranks (routed experts: 0)
    tp_partial: bool = False  # held whole on every TP rank, but each rank's gradient is a partial sum
    stage_copy: bool = (
        False  # a copy of a parameter owned by another pipeline stage (embedding on the last stage)
    )

    @property
    def is_expert(self) -> bool:
        return self.ep_dim is not None


class Meshes:
    """DeviceMeshes over megatron's groups, built once: TP (1-D) and EP x TP (2-D) for experts."""

    def __init__(self, topo):
        from torch.distributed.device_mesh import DeviceMesh

        kind = topo.device.type
        self.tp = DeviceMesh.from_group(topo.tp_group, kind, mesh_dim_names=("tp",))
        # rank grid of this rank's expert block: [ep_rank, tp_rank] -> global rank
        me = torch.tensor([topo.rank_in("ep"), topo.rank_in("tp"), topo.rank], device=topo.device)
        block = [torch.zeros_like(me) for _ in range(topo.ep * topo.tp)]
        dist.all_gather(block, me, group=topo.ep_tp_group)
        grid = torch.zeros(topo.ep, topo.tp, dtype=torch.long)
        for e, t, r in (b.tolist() for b in block):
            grid[e, t] = r
        self.ep_tp = DeviceMesh.from_group(
            [topo.ep_group, topo.tp_group], kind, mesh=grid, mesh_dim_names=("ep", "tp")
        )


def to_dtensor(t: torch.Tensor, layout: ParamLayout, meshes: Meshes, global_shape: torch.Size):
    """View this rank's shard as a DTensor of the full tensor (no communication)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if layout.tp_dim is None and layout.ep_dim is None:
        return t
    full = torch.empty(global_shape, device="meta")
    if layout.ep_dim is None:
        mesh, placements = meshes.tp, [Shard(layout.tp_dim)]
    else:
        tp = Replicate() if layout.tp_dim is None else Shard(layout.tp_dim)
        mesh, placements = meshes.ep_tp, [Shard(layout.ep_dim), tp]
    return DTensor.from_local(t, mesh, placements, run_check=False, shape=full.shape, stride=full.stride())


def counts_in_norm(layout: ParamLayout, ranks: dict[str, int]) -> bool:
    """Whether this rank's copy of a parameter is the one counted in the global gradient norm.

    `ranks` holds this rank's tp / dp / edp ranks (dp: its rank over dp x cp, the dense replicas).
    Exactly one rank in the world counts each distinct shard: replicas over DP (or expert-DP), over
    TP for TP-replicated parameters, and the last stage's copy of the embedding are skipped.
    """
    if layout.stage_copy:
        return False
    if layout.is_expert:
        return ranks["edp"] == 0
    return ranks["dp"] == 0 and (layout.tp_dim is not None or ranks["tp"] == 0)


def local_shard(
    full: torch.Tensor, layout: ParamLayout, ranks: dict[str, int], sizes: dict[str, int]
) -> torch.Tensor:
    """This rank's piece of a whole tensor: split over EP, then over TP (the inverse of to_dtensor)."""
    if layout.ep_dim is not None:
        full = full.chunk(sizes["ep"], dim=layout.ep_dim)[ranks["ep"]]
    if layout.tp_dim is not None:
        full = full.chunk(sizes["tp"], dim=layout.tp_dim)[ranks["tp"]]
    return full
