"""torch.compile of one transformer block (the trainer compiles block by block): one graph, eager's numbers.

The MoE kernels (router, permute / unpermute, grouped SwiGLU) are torch custom ops, so dynamo never traces
their Python (a data-pointer alignment check, Triton launches) and a compiled MoE block is one graph.
CPU: the Triton path under the interpreter, fp32, tiny preset; `opcheck` checks each op's fake (shapes,
strides, dtypes) and autograd registration against the real op; the block is compiled with aot_eager
(dynamo + AOTAutograd, no code generation: seconds) and compared with the eager block.
GPU (`gpu` marker): the small preset's MoE block in bf16 on the grouped_mm backend, compiled with inductor.
"""

from __future__ import annotations

import pytest
import torch

import r1core.kernels.moe_permute  # noqa: F401  (defines the r1core:: custom ops; r1core.kernels loads them lazily)
import r1core.kernels.moe_route  # noqa: F401
from r1core.kernels.grouped_swiglu import grouped_swiglu_backend
from r1core.model import Transformer, presets
from r1core.model.moe import RouterSpec, route_ref
from r1core.testing import assert_close_to_ref


def _moe_block(args, device, dtype, B, T):
    """The first MoE block of a fresh model (parameters cast like the engine's), its input and AttnMeta."""
    torch.manual_seed(0)
    model = Transformer(args.replace(moe_impl="triton", n_mtp_modules=0)).to(device)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    for m in model.moe_layers():  # a nonzero aux-free bias, so the selection-only bias is exercised
        m.gate.e_score_correction_bias.normal_(0.0, 0.01)
    tokens = torch.randint(0, args.vocab_size, (B, T), device=device)
    x = model.embed(tokens).detach()
    return model.layers[str(args.n_dense_layers)], x, model.attn_meta(tokens)


def _outputs_and_grads(block, fn, x, meta) -> dict[str, torch.Tensor]:
    """The block's output and balance loss, and the grads of x and every parameter under a loss that weights
    each output element differently."""
    x = x.clone().requires_grad_()
    out, aux = fn(x, meta)
    g = torch.linspace(-1, 1, out.numel(), device=x.device).view_as(out)
    params = [p for p in block.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out.float() * g).sum() + aux, [x, *params])
    names = ["grad x"] + [n for n, p in block.named_parameters() if p.requires_grad]
    return {"out": out.detach(), "aux": aux.detach(), **dict(zip(names, grads))}


def test_compiled_moe_block_has_no_graph_break_and_gives_eager_outputs_and_grads():
    block, x, meta = _moe_block(presets["tiny"], "cpu", torch.float32, 2, 16)
    want = _outputs_and_grads(block, block, x, meta)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    got = _outputs_and_grads(block, compiled, x, meta)
    torch._dynamo.reset()
    assert got.keys() == want.keys()
    for name, ref in want.items():
        assert_close_to_ref(got[name], ref, floor=1e-6 * ref.abs().max().item() + 1e-12, name=name)


def test_moe_custom_ops_fakes_and_autograd_agree_with_the_real_ops():
    ops = torch.ops.r1core
    g = torch.Generator().manual_seed(0)
    T, E, K, D, I = 13, 8, 2, 24, 40
    spec = RouterSpec(E, K, 4, 2, presets["tiny"].score_func, 2.5, True)
    logits = torch.randn(T, E, generator=g, requires_grad=True)
    bias = torch.randn(E, generator=g) * 0.01
    w_TK, idx, counts = route_ref(logits.detach(), bias, spec)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    y_PD = torch.randn(T * K, D, generator=g, requires_grad=True)
    w_TK = w_TK.clone().requires_grad_()
    seg = torch.tensor([5, 0, 9, 3])  # every row in a segment: h13 rows past them are left unwritten
    xs = torch.randn(17, D, generator=g, requires_grad=True)
    ws = [torch.randn(4, *s, generator=g).mul(0.2).requires_grad_() for s in ((2, I, D), (D, I))]
    route_args = (logits, bias, E, K, 4, 2, spec.score_func.value, 2.5, True)
    cases = {
        "moe_route_fwd": (ops.moe_route_fwd.default, route_args),
        "moe_permute_fwd (padded)": (ops.moe_permute_fwd.default, (x, idx, counts, 4)),
        "moe_unpermute_fwd": (
            ops.moe_unpermute_fwd.default,
            (y_PD, torch.randperm(T * K, generator=g).view(T, K), w_TK),
        ),
        "grouped_swiglu_fwd": (ops.grouped_swiglu_fwd.default, (xs, *ws, seg, "auto")),
    }
    for name, (op, args) in cases.items():
        result = torch.library.opcheck(op, args)
        failed = {k: v for k, v in result.items() if v != "SUCCESS"}
        assert not failed, f"{name}: {failed}"


def _rel_err(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
def test_gpu_compiled_small_moe_block_bf16_is_one_graph_on_grouped_mm_close_to_eager():
    """The bench's path: bf16, cuDNN attention, grouped_mm experts on sm90, inductor. The compiled block's
    error against the fp32 eager block stays within twice the bf16 eager block's (by norm per tensor: bf16
    may flip a near-tied routing decision either way) plus 1e-3."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    args = presets["small"].replace(n_layers=2)
    block, x, meta = _moe_block(args, "cuda", torch.bfloat16, 2, 1024)
    experts = block.ffn.experts
    x_PD = torch.empty(64, args.dim, device="cuda", dtype=torch.bfloat16)
    if torch.cuda.get_device_capability()[0] == 9:  # the path whose alignment check broke the graph
        assert grouped_swiglu_backend(x_PD, experts.w13, experts.w2) == "grouped_mm"
        seg = torch.tensor([16, 0, 32, 16] + [0] * (args.n_routed_experts - 4), device="cuda")
        fails = torch.library.opcheck(
            torch.ops.r1core.grouped_swiglu_fwd.default,
            (x_PD.normal_().requires_grad_(), experts.w13, experts.w2, seg, "grouped_mm"),
        )
        assert all(v == "SUCCESS" for v in fails.values()), fails
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):  # bench_train's attention backend
        torch._dynamo.reset()
        explained = torch._dynamo.explain(block)(x, meta)
        assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
        eager = _outputs_and_grads(block, block, x, meta)
        torch._dynamo.reset()
        compiled = _outputs_and_grads(block, torch.compile(block, fullgraph=True), x, meta)
        torch._dynamo.reset()
    for p in block.parameters():  # the fp32 reference (cuDNN attention has no fp32 kernel: default SDPA)
        p.data = p.data.float()
    ref = _outputs_and_grads(block, block, x.float(), meta)
    for name, r32 in ref.items():
        err, err_lp = _rel_err(compiled[name], r32), _rel_err(eager[name], r32)
        assert err <= 2 * err_lp + 1e-3, (
            f"bf16 compiled {name}: relative error {err:.3e} > 2 * {err_lp:.3e} + 1e-3"
        )
