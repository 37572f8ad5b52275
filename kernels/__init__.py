"""r1core.kernels: Triton (and CUDA-extension) implementations of r1core's hot paths.

Each `<op>.py` holds the Triton kernels, a launcher that asserts the contract, the
autograd.Function, the public `<op>()` and `<op>_ref()` (readable PyTorch, the test oracle).
Modules import lazily so `import r1core.kernels` never needs Triton or a GPU.
"""

from __future__ import annotations

import importlib
import sys


def _hand_over_to_installed(name: str) -> None:
    """Put the package `name` found elsewhere on sys.path in this folder's place in sys.modules."""
    import importlib.machinery
    import importlib.util
    import os

    repo_root = os.path.realpath(os.path.dirname(os.path.dirname(__file__)))
    search = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != repo_root]
    spec = importlib.machinery.PathFinder.find_spec(name, search)
    if spec is None or spec.loader is None:
        del sys.modules[name]
        raise ModuleNotFoundError(
            f"No module named {name!r} (the repository's {name}/ folder is r1core.{name})", name=name)
    module = importlib.util.module_from_spec(spec)
    # The import system hands every importer whatever sys.modules holds under the name once this
    # module's code has run, so the installed package replaces the folder everywhere.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


if __name__ == "kernels":
    # This folder ships as `r1core.kernels`. It is reachable as a top-level `kernels` only when the
    # repository root is on sys.path (`python -m pytest`, `python -c` from the root), where it would
    # shadow the unrelated PyPI package `kernels` that transformers (>= 5.25) imports in its model
    # code. Step aside for that package, or fail exactly as a missing module would.
    _hand_over_to_installed(__name__)


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
