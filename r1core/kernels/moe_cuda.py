"""MoE routing and token permutation on the CUDA extension `r1core._C` (csrc/moe_route, csrc/moe_permute).

The contracts are r1core.model.moe's refs (docs/ARCHITECTURE.md, "MoE contracts"):

    moe_route_cuda(logits_TE, bias_E, spec)                 -> weights_TK fp32, idx_TK int64, counts_E int64
        s = sigmoid(logits) | softmax(logits);  c = s + bias (selection only)
        group score = sum of the top-2 c (sigmoid) | max c (softmax); keep spec.topk_groups groups
        idx = top-k of c, ties toward the lower index;  w = s[idx] / (sum_k s[idx] + 1e-20) * route_scale
    moe_permute_cuda(x_TD, idx_TK, counts_E, pad_multiple)  -> x_PD, pos_TK
        segment e starts at exclusive_cumsum(round_up(counts, pad))[e]; rows in (token, k) order;
        P = T*K (+ E*(pad-1) when padded) is static; padding rows and the tail are zero
    moe_unpermute_cuda(y_PD, pos_TK, weights_TK)            -> y_TD[t] = sum_k w[t,k] * y_PD[pos[t,k]]
        (fp32 acc)

Each op is an autograd.Function: the router's backward is PyTorch math on the [T, K] gathered scores,
permute's backward is the gather-sum kernel (unpermute with unit weights), unpermute's backward is a
kernel producing grad_y_PD (zero on rows no token reads) and grad_weights_TK.

Softmax scores are computed by torch before the kernel (sigmoid is fused into it): top-k selection must
be bit-identical to the reference, and torch's softmax reduction order is not worth replicating for the
V2-style configuration; the fused sigmoid reproduces torch's instruction sequence (moe_route.cu).

Like the refs, the ops accept any memory layout (inputs are made contiguous, a no-op in the model) and
cast the bias and weights to fp32; the binding (csrc/r1core_ext.cpp) checks everything else with errors
that name the argument. Importing this module never needs CUDA; calling an op without the built
extension raises a RuntimeError that names the build command.

Legend: T tokens, D dim, E experts, K experts per token, P permuted rows.
"""

from __future__ import annotations

import importlib

import torch
from torch.autograd.function import once_differentiable

from r1core.model.args import ScoreFunc
from r1core.model.moe import RouterSpec

BUILD_COMMAND = "R1CORE_BUILD_CUDA=1 pip install -e . --no-build-isolation"

_SIGMOID_IN_KERNEL, _PRECOMPUTED_SCORES = 0, 1
_GROUP_TOP2_SUM, _GROUP_MAX = 0, 1


def _load():
    """(module, None) or (None, the ImportError). Not cached, so a later build is picked up."""
    try:
        return importlib.import_module("r1core._C"), None
    except ImportError as err:
        return None, err


def is_built() -> bool:
    """Whether the CUDA extension r1core._C imports."""
    return _load()[0] is not None


def _ext():
    ext, err = _load()
    if ext is None:
        raise RuntimeError(
            f"MoE impl 'cuda' needs r1core's CUDA extension r1core._C, which is not available ({err}). "
            f"Build it where a CUDA toolkit and a CUDA build of torch are installed: `{BUILD_COMMAND}`; "
            "or choose impl 'triton' or 'ref'."
        )
    return ext


def _gathered_weights(logits_TE: torch.Tensor, idx_TK: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """The router's weights as a differentiable function of the logits, given the selection (route_ref's
    math)."""
    logits_TE = logits_TE.float()
    if spec.score_func == ScoreFunc.sigmoid:
        s_TK = logits_TE.gather(1, idx_TK).sigmoid()  # elementwise, so gather first: [T, K] work only
    else:
        s_TK = logits_TE.softmax(dim=-1).gather(1, idx_TK)
    if spec.norm_topk_prob:
        s_TK = s_TK / (s_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return s_TK * spec.route_scale


class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, bias_E, spec: RouterSpec):
        if spec.score_func == ScoreFunc.sigmoid:
            inputs, mode, group = logits_TE, _SIGMOID_IN_KERNEL, _GROUP_TOP2_SUM
        else:
            inputs, mode, group = logits_TE.float().softmax(dim=-1), _PRECOMPUTED_SCORES, _GROUP_MAX
        weights_TK, idx_TK, counts_E = _ext().moe_route(
            inputs,
            bias_E,
            spec.top_k,
            spec.n_groups,
            spec.topk_groups,
            mode,
            group,
            spec.norm_topk_prob,
            float(spec.route_scale),
        )
        ctx.save_for_backward(logits_TE, idx_TK)
        ctx.spec = spec
        ctx.mark_non_differentiable(idx_TK, counts_E)
        return weights_TK, idx_TK, counts_E

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_weights_TK, _grad_idx, _grad_counts):
        logits_TE, idx_TK = ctx.saved_tensors
        with torch.enable_grad():
            logits = logits_TE.detach().requires_grad_()
            (grad_logits,) = torch.autograd.grad(
                _gathered_weights(logits, idx_TK, ctx.spec), logits, grad_weights_TK
            )
        return grad_logits, None, None


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, idx_TK, counts_E, pad_multiple: int):
        x_PD, pos_TK = _ext().moe_permute(x_TD, idx_TK, counts_E, pad_multiple)
        ctx.save_for_backward(pos_TK)
        ctx.mark_non_differentiable(pos_TK)
        return x_PD, pos_TK

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x_PD, _grad_pos):
        (pos_TK,) = ctx.saved_tensors
        # grad_x[t] = sum_k grad_x_PD[pos[t, k]]: the combine kernel with unit weights.
        return _ext().moe_unpermute(grad_x_PD.contiguous(), pos_TK, None), None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_PD, pos_TK, weights_TK):
        y_TD = _ext().moe_unpermute(y_PD, pos_TK, weights_TK)
        ctx.save_for_backward(y_PD, pos_TK, weights_TK)
        return y_TD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y_TD):
        y_PD, pos_TK, weights_TK = ctx.saved_tensors
        need_y, _, need_w = ctx.needs_input_grad
        grad_y_PD, grad_w_TK = _ext().moe_unpermute_backward(
            grad_y_TD.contiguous(), y_PD, pos_TK, weights_TK, need_y, need_w
        )
        return grad_y_PD, None, grad_w_TK


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise RuntimeError(message)


def _check_cuda(t: torch.Tensor, name: str) -> None:
    # Checked here before the extension: a TORCH_CHECK failure inside r1core._C crashed the process on the
    # GPU machine (torch 2.11, CUDA 13.0) instead of raising, so no bad input may reach the binding.
    _require(t.is_cuda, f"{name} must be a CUDA tensor, got device {t.device}")


def moe_route_cuda(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, spec: RouterSpec):
    """Group-limited top-k routing -> (weights_TK fp32, idx_TK int64, counts_E int64); see the module
    docstring."""
    _ext()
    _check_cuda(logits_TE, "logits_TE")
    _require(
        logits_TE.dtype in _FLOATS, f"logits_TE must be float32, bfloat16 or float16, got {logits_TE.dtype}"
    )
    if logits_TE.dim() != 2 or logits_TE.shape[1] != spec.n_experts:
        raise ValueError(f"logits_TE must be [T, n_experts={spec.n_experts}], got {tuple(logits_TE.shape)}")
    if bias_E is not None:
        _check_cuda(bias_E, "bias_E")
        _require(
            bias_E.device == logits_TE.device,
            f"bias_E is on {bias_E.device}, logits_TE on {logits_TE.device}",
        )
        _require(
            bias_E.dim() == 1 and bias_E.numel() == spec.n_experts,
            f"bias_E has {bias_E.numel()} entries for {spec.n_experts} experts",
        )
    bias_E = None if bias_E is None else bias_E.float().contiguous()
    return _Route.apply(logits_TE.contiguous(), bias_E, spec)


def moe_permute_cuda(x_TD: torch.Tensor, idx_TK: torch.Tensor, counts_E: torch.Tensor, pad_multiple: int = 1):
    """Expert-contiguous copy of the routed tokens -> (x_PD, pos_TK); see the module docstring.

    Segment sizes are counted on the device from idx_TK (counts_E must be its bincount; only its shape is
    used).
    """
    _ext()
    for t, name in ((x_TD, "x_TD"), (idx_TK, "idx_TK"), (counts_E, "counts_E")):
        _check_cuda(t, name)
    _require(x_TD.dtype in _FLOATS, f"x_TD must be float32, bfloat16 or float16, got {x_TD.dtype}")
    _require(idx_TK.dtype == torch.int64, f"idx_TK must be Long (int64), got {idx_TK.dtype}")
    _require(
        x_TD.dim() == 2 and idx_TK.dim() == 2,
        f"x_TD and idx_TK must be 2-D, got {tuple(x_TD.shape)}, {tuple(idx_TK.shape)}",
    )
    _require(
        idx_TK.shape[0] == x_TD.shape[0], f"idx_TK has {idx_TK.shape[0]} rows for {x_TD.shape[0]} tokens"
    )
    _require(int(pad_multiple) >= 1, f"pad_multiple must be >= 1, got {pad_multiple}")
    return _Permute.apply(x_TD.contiguous(), idx_TK.contiguous(), counts_E, int(pad_multiple))


def moe_unpermute_cuda(y_PD: torch.Tensor, pos_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """y_TD[t] = sum_k weights[t, k] * y_PD[pos[t, k]], accumulated in fp32, returned in y_PD's dtype."""
    _ext()
    for t, name in ((y_PD, "y_PD"), (pos_TK, "pos_TK"), (weights_TK, "weights_TK")):
        _check_cuda(t, name)
    _require(y_PD.dtype in _FLOATS, f"y_PD must be float32, bfloat16 or float16, got {y_PD.dtype}")
    _require(pos_TK.dtype == torch.int64, f"pos_TK must be Long (int64), got {pos_TK.dtype}")
    _require(
        weights_TK.shape == pos_TK.shape,
        f"weights_TK shape {list(weights_TK.shape)} != pos_TK shape {list(pos_TK.shape)}",
    )
    return _Unpermute.apply(y_PD.contiguous(), pos_TK.contiguous(), weights_TK.float().contiguous())
