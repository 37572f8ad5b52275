"""`model.precision: fp8`: DeepSeek-V3's FP8 training recipe applied to a built model (report §3.3).

The GEMMs of every linear layer (MLA projections, dense MLPs, shared experts, the MTP projection) and
of the routed experts run in e4m3 with fine-grained scales and fp32 accumulation (r1core.kernels.fp8,
registered here as `Fp8Ops` when r1core.kernels is imported);
attention itself, norms, the router, embeddings and the output head stay in the parameters' dtype, as
in the report. Parameters, gradients and optimizer state keep their dtype: FP8 lives only inside
the GEMMs. A layer whose dims are not multiples of 128 (the tile size) keeps its bf16 GEMM and is
listed by `apply_precision` (in the small preset: `wkv_a`, 576 outputs). `fp8_dense` converts the linear
layers only and leaves the routed experts on bf16 `torch._grouped_mm`.

Conversion changes the modules' classes in place, so state dicts, checkpoints and isinstance checks
(`nn.Linear`, `GroupedExperts`) see the same model. Routed experts need each expert's rows padded
to 128 (one expert per 128-row tile), which the local dispatcher provides (`pad_multiple = 128`).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, NamedTuple

import torch
from torch import nn

from .args import Precision
from .moe import GroupedExperts, MoE

log = logging.getLogger(__name__)
TILE = 128


class Fp8Ops(NamedTuple):
    """The FP8 GEMMs (contracts of r1core.kernels.fp8), which `r1core.kernels` registers when imported,
    as it does the MoE ops: the model itself never imports kernel code."""

    linear: Callable  # (x, weight, impl) -> x @ weight.T
    grouped_swiglu: Callable  # (x_PD, w13, w2, seg_E, impl) -> y_PD
    torch_blockwise_supported: Callable  # (device_index, b_rows) -> bool


_FP8_OPS: list[Fp8Ops | Callable[[], Fp8Ops]] = []


def register_fp8_ops(ops: Fp8Ops | Callable[[], Fp8Ops]) -> None:
    _FP8_OPS[:] = [ops]


def fp8_ops() -> Fp8Ops:
    if not _FP8_OPS:
        raise LookupError(
            "model.precision=fp8: no FP8 GEMMs are registered; `import r1core.kernels` registers them"
        )
    if not isinstance(_FP8_OPS[0], Fp8Ops):
        _FP8_OPS[0] = _FP8_OPS[0]()
    return _FP8_OPS[0]


def fp8_backend(b_rows: bool) -> str:
    """The dense GEMM backend on this machine: torch (cuBLASLt blockwise), triton, or ref (CPU)."""
    forced = os.environ.get("R1CORE_FP8_BACKEND")
    if forced:
        return forced
    if not torch.cuda.is_available():
        return "ref"
    supported = fp8_ops().torch_blockwise_supported(torch.cuda.current_device(), b_rows)
    return "torch" if supported else "triton"


class Fp8Linear(nn.Linear):
    """nn.Linear (no bias) whose forward, dgrad and wgrad GEMMs run in FP8."""

    fp8_impl: str = "ref"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_ops().linear(x, self.weight, self.fp8_impl)


class Fp8GroupedExperts(GroupedExperts):
    """Routed experts whose three grouped GEMMs (and their gradients) run in FP8."""

    fp8_impl: str = "ref"

    def forward(self, x_PD: torch.Tensor, seg_E: torch.Tensor) -> torch.Tensor:
        return fp8_ops().grouped_swiglu(x_PD, self.w13, self.w2, seg_E, self.fp8_impl)


def _fits(*dims: int) -> bool:
    return all(d % TILE == 0 for d in dims)


def apply_precision(model: nn.Module, precision: Precision | str) -> list[str]:
    """Switch `model`'s GEMMs to `precision`; returns the names of the layers left in bf16."""
    if Precision(precision) == Precision.bf16:
        return []
    head = getattr(model, "head", None)
    dense_impl = fp8_backend(b_rows=False)
    expert_impl = "ref" if dense_impl == "ref" else "triton"  # torch has no blockwise grouped GEMM on sm90
    # fp8_dense: routed experts keep torch._grouped_mm in bf16; our Triton fp8 grouped GEMM measured
    # 0.12-0.14x of it (fwd + bwd, H100, 2026-12-06), so there FP8 costs time instead of saving it
    experts_fp8 = Precision(precision) == Precision.fp8
    kept = []
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and mod is not head:
            if mod.bias is None and _fits(mod.in_features, mod.out_features):
                mod.__class__ = Fp8Linear
                mod.fp8_impl = dense_impl
            else:
                kept.append(name)
        elif type(mod) is GroupedExperts and experts_fp8:
            if _fits(mod.w13.shape[2], mod.w13.shape[3]):
                mod.__class__ = Fp8GroupedExperts
                mod.fp8_impl = expert_impl
            else:
                kept.append(name)
    for mod in model.modules():
        if isinstance(mod, MoE) and isinstance(mod.experts, Fp8GroupedExperts):
            mod.dispatcher.pad_multiple = TILE
    if kept:
        log.info(
            "precision %s: %d layers keep bf16 GEMMs (dims not multiples of %d): %s",
            Precision(precision).value,
            len(kept),
            TILE,
            ", ".join(kept),
        )
    return kept
