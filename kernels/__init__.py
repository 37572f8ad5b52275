"""r1core.kernels: Triton (and CUDA-extension) implementations of r1core's hot paths.

Each `<op>.py` holds the Triton kernels, a launcher that asserts the contract, the
autograd.Function, the public `<op>()` and `<op>_ref()` (readable PyTorch, the test oracle).
Modules import lazily so `import r1core.kernels` never needs Triton or a GPU.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # fused GRPO loss / fused linear cross-entropy (issue: fused GRPO loss kernel)
    "grpo_loss": "grpo", "grpo_loss_ref": "grpo",
    "linear_cross_entropy": "grpo", "linear_cross_entropy_ref": "grpo",
    "token_logprobs": "grpo",
    # MoE hot path (issue: MoE kernels)
    "moe_route": "moe_router", "moe_route_ref": "moe_router",
    "moe_permute": "permute", "moe_permute_ref": "permute",
    "moe_unpermute": "permute", "moe_unpermute_ref": "permute",
    "grouped_swiglu": "grouped_gemm", "grouped_swiglu_ref": "grouped_gemm",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def moe_ops(impl: str):
    """(route, permute, unpermute, grouped_swiglu) with the contracts of r1core.model.moe's refs."""
    if impl == "triton":
        from .grouped_gemm import grouped_swiglu
        from .permute import moe_permute, moe_unpermute
        from .moe_router import moe_route

        return moe_route, moe_permute, moe_unpermute, grouped_swiglu
    if impl == "cuda":
        from .grouped_gemm import grouped_swiglu
        from .moe_cuda import moe_permute_cuda, moe_route_cuda, moe_unpermute_cuda

        return moe_route_cuda, moe_permute_cuda, moe_unpermute_cuda, grouped_swiglu
    raise ValueError(f"unknown MoE implementation {impl!r}; choose ref, triton or cuda")
