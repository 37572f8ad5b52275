"""Training: the engine (one device or any tp × pp × ep × dp layout), objectives and the LM loop."""

from .engine import LocalEngine, LRSchedule, OptimConfig, ParallelEngine, TrainEngine, build_engine, lr_at
from .objectives import GRPOObjective, LMObjective

__all__ = [
    "GRPOObjective",
    "LMObjective",
    "LRSchedule",
    "LocalEngine",
    "OptimConfig",
    "ParallelEngine",
    "TrainEngine",
    "build_engine",
    "lr_at",
]
