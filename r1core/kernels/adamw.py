"""AdamW in one Triton pass per tensor, with the fp32 master copy and BF16 moments folded in.

torch's fused AdamW runs every parameter through `multi_tensor_apply`: launches of at most 320 blocks of
65,536 elements, so the small preset's 1.7B parameters take about 80 launches whose last wave leaves most SMs
idle. On an H100 it moved their 27 GB of bf16 AdamW traffic at 2.2 TB/s, 73 % of the copy bandwidth, and was
the largest single kernel of the graphed training step (benchmarks/RESULTS.md 10g, 10h). Here each tensor
gets one launch with one program per BLOCK elements: a plain bandwidth-bound stream (93 % in 10h).

With fp32 master weights, r1core's ordinary step makes two more passes around torch's AdamW: the bf16
gradients are copied into fp32 master gradients before it, and the masters are rounded back into the
model after it (megatron's "main params"; 44 bytes per parameter in all, the clip folded in). Given the
model parameter beside each master (`sources`), this kernel reads the bf16 gradient itself and writes the
rounded parameter itself: 28 bytes per parameter, and no fp32 gradient is ever allocated. With
`bf16_moments`, the two moments are stored in BF16, as DeepSeek-V3 trained (its report, section 3.3.2:
"we adopt the BF16 data format instead of FP32 to track the first and second moments"): 20 bytes.

The update is torch's fused AdamW's, in fp32 whatever the storage dtype (its `_fused_adamw` kernel):

    g = grad / grad_scale                      (grad_scale: the clip factor the engine folds in)
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

where t is the tensor's step count, incremented before the update. With `found_inf` set (a device
scalar, 1 where the gradient norm was not finite) nothing is read or written and the step counts stay,
as torch's fused AdamW skips a step under GradScaler; the skip needs no host sync, so a CUDA graph of
the whole training step can hold it. Unlike torch's kernel, the clipped gradient is not stored back into
`.grad`: nothing reads it after the step, and the write is an eighth of the pure-bf16 traffic.

The optimizer is a `torch.optim.AdamW` (param groups, state names and `state_dict` are torch's), created
with `fused=True` so the engine folds the clip and the skip into it as it does for torch's fused one.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

BLOCK_GPU = 4096


@triton.jit
def _adamw_kernel(
    p_ptr,  # the tensor stepped: the fp32 master, or the parameter itself
    g_ptr,  # its gradient (the model parameter's, in the model's dtype, when there is a master)
    m_ptr,
    v_ptr,
    out_ptr,  # the model parameter the master is rounded into (HAS_OUT)
    step_ptr,  # this tensor's step count, already incremented
    lr_ptr,
    scale_ptr,  # the clip's inverse factor (HAS_SCALE)
    inf_ptr,  # 1 where the step is skipped (HAS_INF)
    n,
    beta1,
    beta2,
    log2_beta1,
    log2_beta2,
    eps,
    weight_decay,
    HAS_OUT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_INF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if HAS_INF:
        n = tl.where(tl.load(inf_ptr) == 0, n, 0)  # a skipped step moves no byte
    mask = offs < n
    step = tl.load(step_ptr).to(tl.float32)
    lr = tl.load(lr_ptr).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(scale_ptr).to(tl.float32))
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = p * (1.0 - lr * weight_decay)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    # IEEE-rounded division and square root, as torch's kernel (Triton's `/` and tl.sqrt are approximate)
    step_size = tl.div_rn(lr, 1.0 - tl.exp2(step * log2_beta1))
    bc2_sqrt = tl.sqrt_rn(1.0 - tl.exp2(step * log2_beta2))
    p = p - tl.div_rn(step_size * m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    if HAS_OUT:
        tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty), mask=mask)


def _block(n: int, on_gpu: bool) -> int:
    # the interpreter runs each program as numpy: one program per (small) test tensor is fastest there
    return BLOCK_GPU if on_gpu else min(BLOCK_GPU, triton.next_power_of_2(max(n, 16)))


def adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> None:
    """One AdamW update of `param` in place (and of `out`, its rounded model copy, when given). `step` is the
    tensor's step count after this step's increment; `lr`, `grad_scale`, `found_inf` are device scalars."""
    n = param.numel()
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("out", out)):
        if t is not None:
            assert t.shape == param.shape and t.is_contiguous(), (
                f"{name} {tuple(t.shape)} vs {tuple(param.shape)}"
            )
            assert t.device == param.device, f"{name} on {t.device}, param on {param.device}"
    assert param.is_contiguous(), "AdamW's kernel steps contiguous tensors"
    if n == 0:
        return
    block = _block(n, param.is_cuda)
    dummy = lr  # never read where the flag is off
    _adamw_kernel[(triton.cdiv(n, block),)](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        out if out is not None else param,
        step,
        lr,
        grad_scale if grad_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        n,
        beta1,
        beta2,
        math.log2(beta1) if beta1 > 0 else -math.inf,
        math.log2(beta2) if beta2 > 0 else -math.inf,
        eps,
        weight_decay,
        HAS_OUT=out is not None,
        HAS_SCALE=grad_scale is not None,
        HAS_INF=found_inf is not None,
        BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )


def adamw_step_ref(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    step,
    lr,
    *,
    beta1,
    beta2,
    eps,
    weight_decay,
    grad_scale=None,
    found_inf=None,
    out=None,
) -> None:
    """adamw_step_ in readable PyTorch: fp32 math, stored back in each tensor's dtype (the test oracle)."""
    if found_inf is not None and float(found_inf) != 0:
        return
    t, lr = float(step), float(lr)
    g = grad.float() / (float(grad_scale) if grad_scale is not None else 1.0)
    p = param.float() * (1 - lr * weight_decay)
    m = beta1 * exp_avg.float() + (1 - beta1) * g
    v = beta2 * exp_avg_sq.float() + (1 - beta2) * g * g
    p = p - lr / (1 - beta1**t) * m / (v.sqrt() / math.sqrt(1 - beta2**t) + eps)
    for dst, src in ((param, p), (exp_avg, m), (exp_avg_sq, v)) + (((out, p),) if out is not None else ()):
        dst.copy_(src)


class TritonAdamW(torch.optim.AdamW):
    """torch's AdamW with its update in `adamw_step_`: same hyperparameters, param groups and state names.

    `sources` maps each stepped fp32 master to its model parameter: the gradient is read from the model
    parameter and the rounded master written back into it (the engine then skips MasterWeights' two copies).
    `bf16_moments` stores exp_avg and exp_avg_sq in BF16. The engine sets `grad_scale` and `found_inf`
    before each step, as for torch's fused AdamW; a `torch.Tensor` learning rate stays on the device."""

    def __init__(self, params, *, sources: dict | None = None, bf16_moments: bool = False, **kw):
        for flag in ("amsgrad", "maximize", "foreach", "differentiable"):
            if kw.get(flag):
                raise ValueError(f"optim.implementation=triton: AdamW's {flag}=True is not supported")
        for flag in ("capturable", "fused"):  # always: step counts and the learning rate live on the device
            kw.pop(flag, None)
        super().__init__(params, fused=True, **kw)
        where = {p.device.type for g in self.param_groups for p in g["params"]}
        if where - {"cuda"} and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"optim.implementation=triton steps CUDA parameters; these are on {sorted(where)} "
                "(use optim.implementation=torch, or TRITON_INTERPRET=1 to run the kernel slowly on the CPU)"
            )
        self.sources = sources or {}
        self.moment_dtype = torch.bfloat16 if bf16_moments else None  # None: the stepped tensor's dtype
        self.grad_scale: torch.Tensor | None = None
        self.found_inf: torch.Tensor | None = None
        self._lr_cache: dict = {}
        self._never: dict = {}  # device -> a zero found_inf

    def _grad_of(self, p: torch.Tensor) -> torch.Tensor | None:
        src = self.sources.get(p)
        return src.grad if src is not None else p.grad

    def init_state(self, p: torch.Tensor) -> dict:
        """Zero state for `p` (also what a checkpoint loads into)."""
        dtype = self.moment_dtype or p.dtype
        return {
            "step": torch.zeros((), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format),
            "exp_avg_sq": torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format),
        }

    def _lr_tensor(self, lr, device) -> torch.Tensor:
        if isinstance(lr, torch.Tensor):
            return lr.to(device=device, dtype=torch.float32)
        key = (float(lr), device)
        if key not in self._lr_cache:  # a fill, no host copy; one entry: a constant rate reuses its tensor
            self._lr_cache = {key: torch.full((), float(lr), dtype=torch.float32, device=device)}
        return self._lr_cache[key]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            live = [(p, g) for p in group["params"] if (g := self._grad_of(p)) is not None]
            if not live:
                continue
            for p, _ in live:
                if not self.state[p]:
                    self.state[p] = self.init_state(p)
            steps = [self.state[p]["step"] for p, _ in live]
            torch._foreach_add_(steps, 1.0)
            if self.found_inf is not None:  # a skipped step keeps its count (a tensor list: no host sync)
                torch._foreach_sub_(steps, [self.found_inf] * len(steps))
            beta1, beta2 = group["betas"]
            device = live[0][0].device
            lr = self._lr_tensor(group["lr"], device)
            # always a found_inf tensor: the ordinary steps that warm up a CUDA graph then compile the same
            # kernel the capture launches (a Triton compile inside a capture is not allowed)
            found_inf = self.found_inf
            if found_inf is None:
                if device not in self._never:
                    self._never[device] = torch.zeros((), dtype=torch.float32, device=device)
                found_inf = self._never[device]
            for p, grad in live:
                st = self.state[p]
                src = self.sources.get(p)
                adamw_step_(
                    p,
                    grad,
                    st["exp_avg"],
                    st["exp_avg_sq"],
                    st["step"],
                    lr,
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    grad_scale=self.grad_scale,
                    found_inf=found_inf,
                    out=src,
                )
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # torch casts floating state to the parameter's dtype
        if self.moment_dtype is not None:
            for st in self.state.values():
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in st:
                        st[k] = st[k].to(self.moment_dtype)
