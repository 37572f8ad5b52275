"""r1core.kernels: Triton (and CUDA-extension) implementations of r1core's hot paths.

Each `<op>.py` holds the Triton kernels, a launcher that asserts the contract, the
autograd.Function, the public `<op>()` and `<op>_ref()` (readable PyTorch, the test oracle):
`from r1core.kernels.grpo_loss import grpo_loss`. Ops: grpo_loss (also linear_cross_entropy and
token_logprobs, which share its engine), moe_route, moe_permute (and moe_unpermute), grouped_swiglu;
moe_cuda wraps the CUDA extension's versions of the MoE ops; fp8 holds the FP8 GEMMs. Importing this
package registers the MoE ops as the model's `moe_impl: triton | cuda` and the GEMMs of
`precision: fp8`; it needs neither Triton nor a GPU (the op modules load at first use).
"""

from __future__ import annotations

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


def _triton_moe_ops():
    from r1core.model.moe import MoEOps

    from .grouped_swiglu import grouped_swiglu
    from .moe_permute import moe_permute, moe_unpermute
    from .moe_route import moe_route

    return MoEOps(moe_route, moe_permute, moe_unpermute, grouped_swiglu)


def _cuda_moe_ops():
    from r1core.model.moe import MoEOps

    from .grouped_swiglu import grouped_swiglu
    from .moe_cuda import moe_permute_cuda, moe_route_cuda, moe_unpermute_cuda

    return MoEOps(moe_route_cuda, moe_permute_cuda, moe_unpermute_cuda, grouped_swiglu)


def _fp8_ops():
    from r1core.model.precision import Fp8Ops

    from .fp8 import fp8_linear, grouped_swiglu_fp8, torch_blockwise_supported

    return Fp8Ops(fp8_linear, grouped_swiglu_fp8, torch_blockwise_supported)


def _register() -> None:
    """Install the kernels as the model's `moe_impl: triton | cuda` and `precision: fp8` GEMMs (loaded at
    first use)."""
    from r1core.model.moe import register_moe_ops
    from r1core.model.precision import register_fp8_ops

    register_moe_ops("triton", _triton_moe_ops)
    register_moe_ops("cuda", _cuda_moe_ops)
    register_fp8_ops(_fp8_ops)


if __name__ != "kernels":  # as the top-level `kernels` this folder has stepped aside above
    _register()
