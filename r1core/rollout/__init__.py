"""Rollout engines: prompts in, grouped `Sample`s out (the rollout/trainer contract lives in types.py).

- `BuiltinEngine` (default): continuous batching over the MLA latent cache, CUDA-graph decode.
- `SGLangEngine` (optional `[sglang]` extra): `sglang.Engine` on the checkpoint exported to HF layout.
"""

import r1core.kernels  # noqa: F401  (registers the triton / cuda MoE ops behind model.moe_impl)

from .builtin import BuiltinEngine
from .sampling import request_uniforms, sample
from .types import RolloutEngine, Sample, SamplingParams, request_seed


def __getattr__(name: str):
    if name == "SGLangEngine":  # imported lazily: the module itself imports sglang only when used
        from .sglang_engine import SGLangEngine

        return SGLangEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BuiltinEngine",
    "RolloutEngine",
    "SGLangEngine",
    "Sample",
    "SamplingParams",
    "request_seed",
    "request_uniforms",
    "sample",
]
