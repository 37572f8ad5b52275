"""Distributed checkpoints with torch.distributed.checkpoint (DCP): parallel shard writes, resharding loads.

Every rank passes a flat dict of its tensors: plain tensors for what it holds whole, DTensors
(views of its shards, r1core.parallel.layout.to_dtensor) for what is split over TP / EP. DCP
writes each distinct shard once (replicas are deduplicated) and, on load, reads whatever byte
ranges the *loading* layout needs, so a checkpoint saved at TP2 x EP2 loads at TP1 x PP2 or on
one device. Keys are global names (layers keep their global index under pipeline parallelism).

Saving is atomic: shards go to `<dir>.tmp`; after a barrier rank 0 renames it to `<dir>`
(replacing an older one only once the new one is complete).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .atomic import fsync_path


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _is_rank0() -> bool:
    return not _dist() or dist.get_rank() == 0


def save(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write `state` (this rank's part) as a DCP checkpoint at `path`, atomically; collective."""
    out = Path(path).absolute()
    tmp = out.with_name(out.name + ".tmp")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    with warnings.catch_warnings():  # one process on purpose (no_dist): torch warns about that at every save
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not _dist())
    _barrier()
    if _is_rank0():
        old = out.with_name(out.name + ".old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        fsync_path(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return out


def load(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Fill `state`'s tensors in place from the checkpoint at `path` (any saving layout); collective."""
    path = Path(path).absolute()
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"{path} is not a distributed checkpoint (no .metadata)")
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        dcp.load(state, checkpoint_id=str(path), no_dist=not _dist())


def saved_keys(path: str | os.PathLike) -> set[str]:
    """Names stored in a checkpoint (reads only its metadata)."""
    reader = dcp.FileSystemReader(str(path))
    return set(reader.read_metadata().state_dict_metadata)
