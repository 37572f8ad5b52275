"""AdamW in one bandwidth-bound Triton pass, with the fp32 master copy and BF16 moments folded in.

torch's fused AdamW runs every parameter through `multi_tensor_apply`: launches of at most 320 blocks of
65,536 elements, so the small preset's 1.7B parameters take about 80 launches whose last wave leaves most SMs
idle. On an H100 it moved their 27 GB of bf16 AdamW traffic at 2.2 TB/s, 73 % of the copy bandwidth, and was
the largest single kernel of the graphed training step (benchmarks/RESULTS.md 10g, 10h). Here all the tensors
of a parameter group that share dtypes go through one launch with one program per BLOCK elements of any of
them: each program finds its tensor by a binary search over the tensors' first blocks and its data at element
offsets from the list's first tensor (`TensorLists`). That ran at 95 % of the copy bandwidth on an H100; one
launch per tensor (`multi_tensor=False`, and any tensor that is strided, unaligned or not a multiple of 8
elements) at 86 %, its 159 launches leaving SMs idle at each tail (10j). `sum_of_squares` reads the gradients
for the clip's norm the same way (103 % of copy, 1.5x torch's `_foreach_norm`).

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
def _adamw_math(p, g, m, v, step, lr, beta1, beta2, ln_beta1, ln_beta2, eps, weight_decay):
    """torch's fused AdamW update in fp32 (g already divided by the clip factor): the new p, m, v."""
    p = p * (1.0 - lr * weight_decay)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    # the bias corrections 1 - beta^step once per program in fp64 (an exact exp; fp32's is approximate on the
    # GPU, off by up to 5e-7 of 1 - 0.95^7), then IEEE-rounded division and square root, as torch's kernel
    # (Triton's `/` and tl.sqrt are approximate)
    t = step.to(tl.float64)
    bc1 = (1.0 - tl.exp(t * ln_beta1)).to(tl.float32)  # fp64: t is, and it promotes the fp32 argument
    bc2 = (1.0 - tl.exp(t * ln_beta2)).to(tl.float32)
    step_size = tl.div_rn(lr, bc1)
    p = p - tl.div_rn(step_size * m, tl.div_rn(tl.sqrt_rn(v), tl.sqrt_rn(bc2)) + eps)
    return p, m, v


@triton.jit
def _adamw_block(
    p_ptr, g_ptr, m_ptr, v_ptr, out_ptr, step_ptr, lr_ptr, scale_ptr, offs, n,
    beta1, beta2, ln_beta1, ln_beta2, eps, weight_decay,
    HAS_OUT: tl.constexpr, HAS_SCALE: tl.constexpr,
):  # fmt: skip
    """One block of one tensor: load, update and store the elements `offs < n`."""
    mask = offs < n
    step = tl.load(step_ptr).to(tl.float32)
    lr = tl.load(lr_ptr).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(scale_ptr).to(tl.float32))
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p, m, v = _adamw_math(p, g, m, v, step, lr, beta1, beta2, ln_beta1, ln_beta2, eps, weight_decay)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    if HAS_OUT:
        tl.store(out_ptr + offs, p.to(out_ptr.dtype.element_ty), mask=mask)


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
    ln_beta1,
    ln_beta2,
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
    _adamw_block(
        p_ptr, g_ptr, m_ptr, v_ptr, out_ptr, step_ptr, lr_ptr, scale_ptr, offs, n,
        beta1, beta2, ln_beta1, ln_beta2, eps, weight_decay, HAS_OUT, HAS_SCALE,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- multi-tensor
# One launch steps a whole list of tensors (as torch's multi_tensor_apply, but with every block of every
# tensor in one grid): program `pid` finds its tensor by a binary search over the tensors' first blocks, and
# finds the tensor's data at element offsets (device tables) from the list's first tensor. `_put_kernel`
# writes the tables from kernel arguments (no host copy), so a CUDA graph can capture a rebuild (its
# gradients have new addresses).


_PUT_BIAS = tl.constexpr(1 << 40)


@triton.jit(do_not_specialize=[f"v{i}" for i in range(16)])
def _put_kernel(
    dst_ptr, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15, N: tl.constexpr
):  # fmt: skip
    """dst[k] = v_k - 2^40 for k < N: up to 16 int64 values from the host into a device table. The host adds
    2^40 to each, so every argument is an int64 (Triton types a small one int32, and each new mix of types
    would compile again, which a CUDA graph's capture does not allow)."""
    tl.store(dst_ptr + 0, v0 - _PUT_BIAS)
    if N > 1:
        tl.store(dst_ptr + 1, v1 - _PUT_BIAS)
    if N > 2:
        tl.store(dst_ptr + 2, v2 - _PUT_BIAS)
    if N > 3:
        tl.store(dst_ptr + 3, v3 - _PUT_BIAS)
    if N > 4:
        tl.store(dst_ptr + 4, v4 - _PUT_BIAS)
    if N > 5:
        tl.store(dst_ptr + 5, v5 - _PUT_BIAS)
    if N > 6:
        tl.store(dst_ptr + 6, v6 - _PUT_BIAS)
    if N > 7:
        tl.store(dst_ptr + 7, v7 - _PUT_BIAS)
    if N > 8:
        tl.store(dst_ptr + 8, v8 - _PUT_BIAS)
    if N > 9:
        tl.store(dst_ptr + 9, v9 - _PUT_BIAS)
    if N > 10:
        tl.store(dst_ptr + 10, v10 - _PUT_BIAS)
    if N > 11:
        tl.store(dst_ptr + 11, v11 - _PUT_BIAS)
    if N > 12:
        tl.store(dst_ptr + 12, v12 - _PUT_BIAS)
    if N > 13:
        tl.store(dst_ptr + 13, v13 - _PUT_BIAS)
    if N > 14:
        tl.store(dst_ptr + 14, v14 - _PUT_BIAS)
    if N > 15:
        tl.store(dst_ptr + 15, v15 - _PUT_BIAS)


@triton.jit
def _owner(first_ptr, pid, T, LOG_T: tl.constexpr):
    """The tensor i with first[i] <= pid < first[i + 1] (first: the T + 1 cumulative block starts)."""
    lo = pid * 0
    hi = lo + T
    for _ in tl.static_range(LOG_T):
        mid = (lo + hi) // 2
        go = tl.load(first_ptr + mid) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _at(base_ptr, off_tab, i):
    """Tensor i of a list: the list's first tensor (a kernel argument, so known 16-byte aligned) plus its
    element offset from the table. Rounding the offset down to a multiple of 16 bytes changes nothing (the
    host checks the alignment) and tells the compiler what a loaded offset cannot, so the accesses can move
    16 bytes at a time (the PTX of an H100 run shows them)."""
    vec = 128 // base_ptr.dtype.element_ty.primitive_bitwidth
    return base_ptr + (tl.load(off_tab + i) // vec) * vec


@triton.jit
def _adamw_multi_kernel(
    first_ptr, n_tab, p_tab, g_tab, m_tab, v_tab, out_tab, step_tab,
    p0, g0, m0, v0, out0, step0,  # the list's first tensors: the tables hold offsets from them
    T, lr_ptr, scale_ptr, inf_ptr, beta1, beta2, ln_beta1, ln_beta2, eps, weight_decay,
    HAS_OUT: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, LOG_T: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    i = _owner(first_ptr, pid, T, LOG_T)
    offs = (pid - tl.load(first_ptr + i)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # numels are multiples of 8 (the host checks): said so, the mask is constant over 8 elements and every
    # access moves 16 bytes (a loaded numel says nothing of its own; a second, unmasked path for whole blocks
    # doubled the registers: one program per SM, 56 % of the copy bandwidth on an H100)
    n = (tl.load(n_tab + i) // 8) * 8
    n = tl.where(tl.load(inf_ptr) == 0, n, 0)  # a skipped step moves no byte
    out_ptr = out0
    if HAS_OUT:
        out_ptr = _at(out0, out_tab, i)
    p_ptr, g_ptr, m_ptr, v_ptr = _at(p0, p_tab, i), _at(g0, g_tab, i), _at(m0, m_tab, i), _at(v0, v_tab, i)
    _adamw_block(
        p_ptr, g_ptr, m_ptr, v_ptr, out_ptr, step0 + tl.load(step_tab + i), lr_ptr, scale_ptr, offs, n,
        beta1, beta2, ln_beta1, ln_beta2, eps, weight_decay, HAS_OUT, HAS_SCALE,
    )  # fmt: skip


@triton.jit
def _sum_squares_kernel(
    first_ptr, n_tab, x_tab, x0, partial_ptr, T, BLOCK: tl.constexpr, LOG_T: tl.constexpr
):  # fmt: skip
    """partial[pid] = the fp32 sum of squares of one block of one tensor of the list."""
    pid = tl.program_id(0)
    i = _owner(first_ptr, pid, T, LOG_T)
    offs = (pid - tl.load(first_ptr + i)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    n = (tl.load(n_tab + i) // 8) * 8  # a multiple of 8: see _adamw_multi_kernel
    x = tl.load(_at(x0, x_tab, i) + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(partial_ptr + pid, tl.sum(x * x, axis=0))


class TensorLists:
    """The device tables of the multi-tensor kernels, kept while the addresses they hold stay the same.

    A table is rebuilt (a new tensor, never written in place) when an address changes, e.g. a gradient that
    backward allocated anew. While a CUDA graph is being captured, every table the capture reads is also kept
    for good, so a graph's replay never reads freed memory."""

    def __init__(self):
        self._tables: dict = {}
        self._captured: dict[int, torch.Tensor] = {}

    def table(self, key, values: list[int], device: torch.device) -> torch.Tensor:
        hit = self._tables.get(key)
        if hit is None or hit[0] != values:
            t = torch.empty(len(values), dtype=torch.int64, device=device)
            for s in range(0, len(values), 16):
                chunk = values[s : s + 16]
                args = [v + _PUT_BIAS.value for v in chunk] + [_PUT_BIAS.value] * (16 - len(chunk))
                _put_kernel[(1,)](t[s:], *args, N=len(chunk))
            hit = self._tables[key] = (values, t)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            self._captured[id(hit[1])] = hit[1]  # once each, however often it is captured
        return hit[1]

    def offsets(self, key, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Each tensor's address as an element offset from the first one's (all 16-byte aligned, so exact)."""
        base, size = tensors[0].data_ptr(), tensors[0].element_size()
        return self.table(key, [(t.data_ptr() - base) // size for t in tensors], tensors[0].device)

    def layout(self, key, tensors: list[torch.Tensor], block: int):
        """(first-block table, numel table, number of programs) of `tensors` split into blocks of `block`."""
        numels = [t.numel() for t in tensors]
        first = [0]
        for n in numels:
            first.append(first[-1] + triton.cdiv(n, block))
        device = tensors[0].device
        return self.table((key, "first"), first, device), self.table((key, "n"), numels, device), first[-1]


def multi_tensor_ok(*tensors: torch.Tensor | None) -> bool:
    """Whether a tensor's operands can take a multi-tensor kernel: contiguous, 16-byte aligned, and a non-zero
    multiple of 8 elements (so every access moves 16 bytes)."""
    return all(
        t is None or (t.is_contiguous() and t.data_ptr() % 16 == 0 and t.numel() > 0 and t.numel() % 8 == 0)
        for t in tensors
    )


def _ln(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


def _log_t(T: int) -> int:
    return max(0, (T - 1).bit_length())


_NORM_TABLES = TensorLists()


def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The fp32 sum of squares of all `tensors` (a gradient norm's square) in one launch per dtype: block
    partial sums, then their sum (deterministic: no atomics). Unaligned or strided tensors go through
    torch's `_foreach_norm`."""
    device = tensors[0].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    by_dtype: dict = {}
    rest = []
    for t in tensors:
        (by_dtype.setdefault(t.dtype, []) if multi_tensor_ok(t) else rest).append(t)
    for dtype, ts in by_dtype.items():
        block = _block(max(t.numel() for t in ts), device.type == "cuda")
        first, numel, grid = _NORM_TABLES.layout(("norm", dtype), ts, block)
        ptrs = _NORM_TABLES.offsets(("norm", dtype, "x"), ts)
        partial = torch.empty(grid, dtype=torch.float32, device=device)
        _sum_squares_kernel[(grid,)](
            first, numel, ptrs, ts[0], partial, len(ts), BLOCK=block, LOG_T=_log_t(len(ts)),
            num_warps=8 if block >= 2048 else 4,
        )  # fmt: skip
        total = total + partial.sum()
    rest = [t for t in rest if t.numel()]
    if rest:
        total = total + torch.stack(torch._foreach_norm(rest, 2.0, dtype=torch.float32)).square().sum()
    return total


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
        _ln(beta1),
        _ln(beta2),
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
    """torch's AdamW with its update in r1core's kernel: same hyperparameters, param groups and state names.

    `multi_tensor` (default): one launch per parameter group and dtype signature; False: one per tensor.

    `sources` maps each stepped fp32 master to its model parameter: the gradient is read from the model
    parameter and the rounded master written back into it (the engine then skips MasterWeights' two copies).
    `bf16_moments` stores exp_avg and exp_avg_sq in BF16. The engine sets `grad_scale` and `found_inf`
    before each step, as for torch's fused AdamW; a `torch.Tensor` learning rate stays on the device."""

    def __init__(
        self,
        params,
        *,
        sources: dict | None = None,
        bf16_moments: bool = False,
        multi_tensor: bool = True,
        **kw,
    ):
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
        self._tables = TensorLists()
        self.multi_tensor = multi_tensor

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
            hyper = dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
            lists: dict = {}  # one multi-tensor launch per dtype signature
            for p, grad in live:
                st, src = self.state[p], self.sources.get(p)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                if self.multi_tensor and multi_tensor_ok(p, grad, m, v, src):
                    sig = (p.dtype, grad.dtype, m.dtype, v.dtype, None if src is None else src.dtype)
                    lists.setdefault(sig, []).append((p, grad, m, v, src, st["step"]))
                    continue
                adamw_step_(
                    p, grad, m, v, st["step"], lr, **hyper,
                    grad_scale=self.grad_scale, found_inf=found_inf, out=src,
                )  # fmt: skip
            for sig, items in lists.items():
                self._step_list((id(group), sig), items, lr, found_inf, hyper)
        return loss

    def _step_list(self, key, items: list, lr, found_inf, hyper: dict) -> None:
        """One `_adamw_multi_kernel` launch over tensors of one dtype signature (p, grad, m, v, out, step)."""
        cols = list(zip(*items))
        p0, g0, m0, v0, out0, step0 = (c[0] for c in cols)
        device = p0.device
        block = _block(max(p.numel() for p in cols[0]), device.type == "cuda")
        first, numel, grid = self._tables.layout(key, list(cols[0]), block)
        has_out = out0 is not None
        tabs = [
            self._tables.offsets((key, name), list(col))
            for name, col in zip(("p", "g", "m", "v", "out", "step"), cols)
            if name != "out" or has_out
        ]
        if not has_out:
            tabs.insert(4, tabs[0])
        _adamw_multi_kernel[(grid,)](
            first, numel, *tabs, p0, g0, m0, v0, out0 if has_out else p0, step0, len(items), lr,
            self.grad_scale if self.grad_scale is not None else lr, found_inf,
            hyper["beta1"], hyper["beta2"],
            _ln(hyper["beta1"]), _ln(hyper["beta2"]),
            hyper["eps"], hyper["weight_decay"],
            HAS_OUT=has_out, HAS_SCALE=self.grad_scale is not None, BLOCK=block,
            LOG_T=_log_t(len(items)), num_warps=8 if block >= 2048 else 4,
        )  # fmt: skip

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # torch casts floating state to the parameter's dtype
        if self.moment_dtype is not None:
            for st in self.state.values():
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in st:
                        st[k] = st[k].to(self.moment_dtype)
