"""Unsharded weights on rank 0: gather TP / EP shards (DTensor.full_tensor) and collect pipeline stages.

For HF export and for pushing weights into a rollout engine. Every rank walks the global names in
one order; the ranks holding a name gather its shards over their mesh, and the lowest of them
sends the whole tensor to rank 0, so no rank ever waits on a peer that waits elsewhere.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from .layout import Meshes, ParamLayout, to_dtensor


def iter_full_state(
    local: dict[str, torch.Tensor],
    layouts: dict[str, ParamLayout],
    meshes: Meshes,
    full_shapes: dict[str, torch.Size],
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Yield (name, whole tensor) on rank 0 and (name, None) elsewhere, name by name; collective."""
    rank = dist.get_rank()
    held = [None] * dist.get_world_size()
    dist.all_gather_object(held, {k: v.dtype for k, v in local.items()})
    for name in full_shapes:
        holders = [r for r, names in enumerate(held) if name in names]
        if not holders:
            raise RuntimeError(f"no rank holds {name!r}")
        owner = min(holders)
        tensor = None
        if name in local:
            tensor = local[name].detach()
            lay = layouts.get(name, ParamLayout())
            if lay.tp_dim is not None or lay.ep_dim is not None:
                tensor = to_dtensor(tensor, lay, meshes, full_shapes[name]).full_tensor()
        if rank == 0 and owner != 0:
            tensor = torch.empty(full_shapes[name], dtype=held[owner][name], device=meshes.tp.device_type)
            dist.recv(tensor, src=owner)
        elif rank == owner and owner != 0:
            dist.send(tensor.contiguous(), dst=0)
        yield name, tensor if rank == 0 else None
