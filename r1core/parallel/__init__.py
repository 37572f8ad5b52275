"""Parallelism on top of the single-device model: tp, pp, cp (context), ep (expert), dp.

megatron-core builds the process groups (topology.py) and provides the TP mappings, the vocab-
parallel embedding and cross-entropy; torch.distributed provides what megatron-core runs only on
CUDA: variable-split all_to_all for expert parallelism, torch.distributed.pipelining schedules,
ZeroRedundancyOptimizer and DCP checkpoints; context.py splits sequences for context parallelism.
`parallelize(model, topo)` shards a built model in place (torchtitan-style); r1core.train.engine
drives it.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .config import ParallelConfig, PPSchedule, check_layout
from .topology import Topology, init_topology, megatron_kwargs


def init_distributed(device: str | torch.device = "auto", timeout_s: float | None = None) -> torch.device:
    """This rank's device, with torch.distributed started from torchrun's environment when WORLD_SIZE > 1.

    `device`: "auto" (cuda when present, else cpu), "cpu", "cuda" or "cuda:N"; a bare "cuda" becomes
    cuda:$LOCAL_RANK, and a GPU is made the current device. The backend follows the device: NCCL bound
    to this rank's GPU (`device_id`: its communicator starts at once and collectives never guess the
    device), gloo on the CPU (which takes no device_id). The one start-up path of `r1core run` and
    `python -m r1core.train`. `timeout_s` (`parallel.timeout_s`): how long a collective waits for the
    other ranks before it raises (torch's default when None); r1core.parallel.failfast then ends the rank.
    """
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        nccl = device.type == "cuda"
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            "nccl" if nccl else "gloo", device_id=device if nccl else None, timeout=timeout
        )
    return device


def parallelize(model, topo):
    from .parallelize import parallelize as _parallelize

    return _parallelize(model, topo)


__all__ = [
    "PPSchedule",
    "ParallelConfig",
    "Topology",
    "check_layout",
    "init_distributed",
    "init_topology",
    "megatron_kwargs",
    "parallelize",
]
