"""r1core.kernels: Triton (and CUDA-extension) implementations of r1core's hot paths.

Each `<op>.py` holds the Triton kernels, a launcher that asserts the contract, the autograd (an
autograd.Function, or, where torch.compile must see one opaque node, a torch custom op with its fake
and backward: the MoE ops and the FP8 linear), the public `<op>()` and `<op>_ref()` (readable PyTorch,
the test oracle): `from r1core.kernels.grpo_loss import grpo_loss`. Ops: grpo_loss (also
linear_cross_entropy and token_logprobs, which share its engine), moe_route, moe_permute (and
moe_unpermute), grouped_swiglu; moe_cuda wraps the CUDA extension's versions of the MoE ops; fp8 holds
the FP8 GEMMs; mla_decode is the rollout engine's decode attention. Importing this package registers the
MoE ops as the model's `moe_impl: triton | cuda` and the GEMMs of `precision: fp8`; it needs neither Triton
nor a GPU (the op modules load at first use).
"""

from __future__ import annotations


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


_register()
