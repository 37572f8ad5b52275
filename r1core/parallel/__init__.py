"""3D (+expert) parallelism on top of the single-device model: tp, pp, ep, dp.

megatron-core builds the process groups (topology.py) and provides the TP mappings, the vocab-
parallel embedding and cross-entropy; torch.distributed provides what megatron-core runs only on
CUDA: variable-split all_to_all for expert parallelism, torch.distributed.pipelining schedules,
ZeroRedundancyOptimizer and DCP checkpoints. `parallelize(model, topo)` shards a built model in
place (torchtitan-style); r1core.train.engine drives it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .config import ParallelConfig, PPSchedule, check_layout
from .topology import Topology, init_topology, megatron_kwargs


def init_distributed() -> torch.device:
    """Start torch.distributed from torchrun's environment (NCCL on GPUs, gloo on CPU); returns this rank's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return device


def parallelize(model, topo):
    from .parallelize import parallelize as _parallelize

    return _parallelize(model, topo)


__all__ = ["PPSchedule", "ParallelConfig", "Topology", "check_layout", "init_distributed", "init_topology",
           "megatron_kwargs", "parallelize"]
