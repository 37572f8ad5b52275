"""MoE kernels (router, permute / unpermute, grouped SwiGLU) against the refs in r1core.model.moe.

CPU: Triton runs under TRITON_INTERPRET=1 in fp32 at small, odd shapes (T*K spanning several rank
blocks, E not a power of two, experts with zero / one / all tokens, pad_multiple > 1, tails past
the last segment). Selections, positions and copies are compared exactly; arithmetic with the
tolerance rule against a float64 reference, the fp32 PyTorch ref being the low-precision one.
GPU (`gpu` marker): the DeepSeek-V3 layer shape in bf16 and small-preset model parity.
"""

from __future__ import annotations

import pytest
import torch

from r1core.kernels.grouped_swiglu import (
    _configs,
    _Segments,
    _wgrad_tma,
    grouped_swiglu,
    grouped_swiglu_backend,
    grouped_swiglu_ref,
)
from r1core.kernels.moe_permute import moe_permute, moe_permute_ref, moe_unpermute, moe_unpermute_ref
from r1core.kernels.moe_route import moe_route, moe_route_ref
from r1core.model import presets
from r1core.model.args import ScoreFunc
from r1core.model.moe import RouterSpec
from r1core.testing import assert_close_to_ref

SIG, SOFT = ScoreFunc.sigmoid, ScoreFunc.softmax


# ------------------------------------------------------------------------------------------------ router
def _weights_fp64(logits_TE, idx_TK, spec):
    """route_ref's weights for a given selection, in float64 (the reference the rule measures against)."""
    l64 = logits_TE.detach().double().requires_grad_()
    s = l64.sigmoid() if spec.score_func == SIG else l64.softmax(dim=-1)
    w = s.gather(1, idx_TK)
    if spec.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * spec.route_scale, l64


def _check_route(logits_TE, bias_E, spec, floor=1e-6):
    l = logits_TE.clone().requires_grad_()
    w, idx, counts = moe_route(l, bias_E, spec)
    l_ref = logits_TE.clone().requires_grad_()
    w_ref, idx_ref, counts_ref = moe_route_ref(l_ref, bias_E, spec)
    assert w.dtype == torch.float32 and idx.dtype == torch.int64 and counts.dtype == torch.int64
    assert torch.equal(idx, idx_ref), (
        f"{(idx != idx_ref).any(dim=1).sum().item()} tokens select other experts"
    )
    assert torch.equal(counts, counts_ref)
    w64, l64 = _weights_fp64(logits_TE, idx_ref, spec)
    assert_close_to_ref(w, w64, w_ref, floor=floor, name="weights_TK")
    g = torch.randn_like(w)
    (grad,) = torch.autograd.grad((w * g).sum(), l)
    (grad_ref,) = torch.autograd.grad((w_ref * g).sum(), l_ref)
    (grad64,) = torch.autograd.grad((w64 * g.double()).sum(), l64)
    assert_close_to_ref(grad, grad64, grad_ref, floor=floor, name="grad logits_TE")
    return w, idx


ROUTER_CASES = {  # E, K, groups, kept groups, score, route_scale, norm, bias, T
    "v3_like_sigmoid_groups_bias": (32, 4, 4, 2, SIG, 2.5, True, True, 37),
    "softmax_no_groups_odd_E_unnormalized": (24, 3, 1, 1, SOFT, 1.0, False, False, 45),
    "softmax_groups_max": (16, 4, 4, 2, SOFT, 1.0, True, False, 19),
    "sigmoid_no_groups_one_token": (8, 2, 1, 1, SIG, 1.0, True, True, 1),
}


@pytest.mark.parametrize("case", ROUTER_CASES)
def test_route_selects_exactly_as_ref_with_close_weights_and_logit_grads(case):
    E, K, G, TG, score, scale, norm, has_bias, T = ROUTER_CASES[case]
    spec = RouterSpec(E, K, G, TG, score, scale, norm)
    bias = torch.randn(E) * 0.05 if has_bias else None
    _check_route(torch.randn(T, E) * 2, bias, spec)


@pytest.mark.parametrize("score", [SIG, SOFT])
def test_route_breaks_group_and_expert_ties_toward_lower_index(score):
    E, K, G, TG = 16, 3, 4, 2
    spec = RouterSpec(E, K, G, TG, score, 1.0, True)
    logits = torch.randint(-1, 2, (64, E)).float()  # three values only: ties at every level
    logits[0] = 0.0  # all tied: groups 0, 1 kept, experts 0, 1, 2 chosen
    # groups 1 and 3 tie on top-2 sums (two 1s each), group 0 has one 1: keep 1 and 3, experts 4, 5, 12
    logits[1] = torch.tensor([1, 0, 0, 0, 1, 1, -1, -1, -1, -1, -1, -1, 1, 1, 0, 0]).float()
    bias = torch.zeros(E) if score == SIG else None
    _, idx = _check_route(logits, bias, spec)
    assert idx[0].tolist() == [0, 1, 2]
    assert idx[1].tolist() == ([4, 5, 12] if score == SIG else [0, 4, 5])  # softmax groups score by max


def test_route_rejects_inconsistent_inputs_naming_the_culprit():
    spec = RouterSpec(16, 2, 4, 2, SIG, 1.0, True)
    with pytest.raises(ValueError, match="spec.n_experts"):
        moe_route(torch.randn(4, 8), None, spec)
    with pytest.raises(ValueError, match="bias_E"):
        moe_route(torch.randn(4, 16), torch.zeros(8), spec)
    with pytest.raises(ValueError, match="top_k"):
        moe_route(torch.randn(4, 16), None, RouterSpec(16, 9, 4, 2, SIG, 1.0, True))


# ------------------------------------------------------------------------------------- permute / unpermute
def _routing(T, K, E, mode, seed=0):
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    elif mode == "half_experts_empty":
        idx = torch.stack([torch.randperm(E // 2, generator=g)[:K] * 2 for _ in range(T)])
    elif mode == "one_expert":  # K = 1: every token on expert E - 1
        idx = torch.full((T, K), E - 1)
    else:  # "duplicates": the contract allows repeated experts within a token
        idx = torch.zeros(T, K, dtype=torch.int64)
    return idx, torch.bincount(idx.flatten(), minlength=E)


PERMUTE_CASES = {  # T, K, E, D, pad, routing
    "random": (37, 4, 8, 24, 1, "random"),
    "random_padded": (37, 4, 8, 24, 4, "random"),
    "empty_experts_padded_two_rank_blocks": (45, 3, 12, 16, 3, "half_experts_empty"),
    "one_token_padded": (1, 2, 6, 8, 2, "random"),
    "all_tokens_one_expert": (20, 1, 5, 8, 1, "one_expert"),
    "duplicate_experts_in_token": (9, 2, 4, 8, 1, "duplicates"),
}


@pytest.mark.parametrize("case", PERMUTE_CASES)
def test_permute_positions_and_rows_equal_ref_and_grad_is_the_row_sum(case):
    T, K, E, D, pad, mode = PERMUTE_CASES[case]
    idx, counts = _routing(T, K, E, mode)
    x = torch.randn(T, D, requires_grad=True)
    x_PD, pos = moe_permute(x, idx, counts, pad)
    x_ref, pos_ref = moe_permute_ref(x, idx, counts, pad)
    assert pos.dtype == torch.int64 and torch.equal(pos, pos_ref)
    assert torch.equal(x_PD, x_ref)  # a copy: exact, zero padding rows and tail included
    unused = torch.ones(x_PD.shape[0], dtype=torch.bool)
    unused[pos.flatten()] = False
    assert (x_PD[unused] == 0).all()
    g = torch.randn_like(x_PD)
    (grad,) = torch.autograd.grad((x_PD * g).sum(), x)
    (grad_ref,) = torch.autograd.grad((x_ref * g).sum(), x)
    grad64 = g.double()[pos].sum(dim=1)
    assert_close_to_ref(grad, grad64, grad_ref, floor=1e-6, name="grad x_TD")


@pytest.mark.parametrize("case", PERMUTE_CASES)
def test_unpermute_matches_ref_and_grads_of_rows_and_weights(case):
    T, K, E, D, pad, mode = PERMUTE_CASES[case]
    idx, counts = _routing(T, K, E, mode)
    _, pos = moe_permute_ref(torch.zeros(T, D), idx, counts, pad)
    y = torch.randn(pos.numel() + (E * (pad - 1) if pad > 1 else 0), D, requires_grad=True)
    w = torch.rand(T, K, requires_grad=True)
    out = moe_unpermute(y, pos, w)
    out_ref = moe_unpermute_ref(y, pos, w)
    y64, w64 = y.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    out64 = (y64[pos] * w64[..., None]).sum(dim=1)
    assert_close_to_ref(out, out64, out_ref, floor=1e-6, name="y_TD")
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), (y, w))
    grads_ref = torch.autograd.grad((out_ref * g).sum(), (y, w))
    grads64 = torch.autograd.grad((out64 * g.double()).sum(), (y64, w64))
    for name, a, b, c in zip(("grad y_PD", "grad weights_TK"), grads, grads64, grads_ref):
        assert_close_to_ref(a, b, c, floor=1e-6, name=name)
    unused = torch.ones(y.shape[0], dtype=torch.bool)
    unused[pos.flatten()] = False
    assert (grads[0][unused] == 0).all()  # rows no token reads get an exact zero gradient


def test_permute_rejects_bad_inputs_naming_the_culprit():
    x, idx = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="idx_TK"):
        moe_permute(x, idx.int(), torch.tensor([8]), 1)
    with pytest.raises(ValueError, match="pad_multiple"):
        moe_permute(x, idx, torch.tensor([8]), 0)
    with pytest.raises(ValueError, match="weights_TK"):
        moe_unpermute(torch.randn(8, 8), idx, torch.rand(4, 3))


# ------------------------------------------------------------------------------------------- grouped SwiGLU
def _ffn_inputs(E, D, I, seg, tail, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    P = sum(seg) + tail
    x = torch.randn(P, D, generator=g, device=device, dtype=dtype)
    x[sum(seg) :] = 0  # rows past the last segment are zero by the permute contract
    w1 = torch.randn(E, I, D, generator=g, device=device, dtype=dtype) * D**-0.5
    w2 = torch.randn(E, D, I, generator=g, device=device, dtype=dtype) * I**-0.5
    w3 = torch.randn(E, I, D, generator=g, device=device, dtype=dtype) * D**-0.5
    return (x, w1, w2, w3), torch.tensor(seg, device=device)


def _gs(x, w1, w2, w3, seg, **kw):
    """grouped_swiglu on separate gate and up weights, stacked as the model stores them (w13 [E, 2, I, D]):
    the gradients reach w1 and w3 through the stack, so each is checked on its own."""
    return grouped_swiglu(x, torch.stack((w1, w3), dim=1), w2, seg, **kw)


GEMM_CASES = {  # E, D, I, segment sizes, rows past the last segment
    "empty_single_and_tail": (4, 24, 40, [3, 0, 17, 1], 4),
    "all_rows_one_expert": (3, 32, 16, [0, 0, 40], 0),
    "one_row": (2, 16, 24, [1, 0], 3),
}


@pytest.mark.parametrize("backend", [None, "grouped_mm_tma"])
@pytest.mark.parametrize("case", GEMM_CASES)
def test_grouped_swiglu_forward_and_grads_match_ref(case, backend):
    # None: the CPU's choice (triton); grouped_mm_tma: torch._grouped_mm's CPU path with r1core's TMA
    # weight-gradient kernel in the interpreter
    E, D, I, seg, tail = GEMM_CASES[case]
    ops64, seg_E = _ffn_inputs(E, D, I, seg, tail)
    ops64 = [t.requires_grad_() for t in ops64]
    ops32 = [t.detach().float().requires_grad_() for t in ops64]
    ops_ref = [t.detach().float().requires_grad_() for t in ops64]
    y = _gs(*ops32, seg_E, backend=backend)
    y_ref = grouped_swiglu_ref(*ops_ref, seg_E)
    y64 = grouped_swiglu_ref(*ops64, seg_E)
    assert_close_to_ref(y, y64, y_ref, floor=1e-6, name="y_PD")
    used = sum(seg)
    assert (y[used:] == 0).all()
    g = torch.randn_like(y64)
    grads = torch.autograd.grad((y * g.float()).sum(), ops32)
    grads_ref = torch.autograd.grad((y_ref * g.float()).sum(), ops_ref)
    grads64 = torch.autograd.grad((y64 * g).sum(), ops64)
    for name, a, b, c in zip(("dx", "dw1", "dw2", "dw3"), grads, grads64, grads_ref):
        assert_close_to_ref(a, b, c, floor=1e-6, name=name)
    assert (grads[0][used:] == 0).all()
    empty = torch.tensor(seg) == 0
    assert all((dw[empty] == 0).all() for dw in grads[1:])


WGRAD_CASES = {  # segment sizes (rows past the last segment: 5), M, N, programs
    # partial 16-row blocks, an empty expert, M, N not multiples of the 32 x 32 tile, 3 programs for 16 tiles
    "partial_blocks_empty_expert": ([5, 0, 40, 17], 48, 40, 3),
    "whole_blocks_more_programs_than_tiles": ([16, 32, 0], 32, 32, 8),
    "all_empty": ([0, 0], 32, 16, 3),
    # fewer rows in all than one 16-row block: the tail's TMA block runs past A's and B's last row
    "fewer_rows_than_a_block": ([3, 4], 32, 16, 2),
}


WGRAD_KERNELS = {  # _wgrad_tma's overrides: the partial last block by one masked TMA block (the default, at
    # two block heights) or by masked loads
    "tma_tail": {},
    "tma_tail_bk32": dict(BLOCK_K=32),
    "masked_tail": dict(TMA_TAIL=False),
}


@pytest.mark.parametrize("kernel", WGRAD_KERNELS)
@pytest.mark.parametrize("case", WGRAD_CASES)
def test_wgrad_tma_kernel_equals_per_segment_products(case, kernel):
    """The persistent TMA weight-gradient kernels: C_e = A[seg e]^T B[seg e] for every expert, against
    float64 products (the interpreter runs the TMA loads, the partial last blocks, the TMA block that ends
    at a segment's end with the rows before it zeroed, and the clipped stores)."""
    seg, M, N, progs = WGRAD_CASES[case]
    g = torch.Generator().manual_seed(3)
    P = sum(seg) + 5
    a, b = torch.randn(P, M, generator=g), torch.randn(P, N, generator=g)
    cfg = _configs(a)
    segs = _Segments(torch.tensor(seg), 16)
    out = _wgrad_tma(a, b, segs, cfg, torch.float32, NUM_PROGS=progs, **WGRAD_KERNELS[kernel])
    starts = [sum(seg[:e]) for e in range(len(seg))]
    ref = torch.stack([a[s : s + n].double().T @ b[s : s + n].double() for s, n in zip(starts, seg)])
    assert cfg["wgrad_tma"]["BLOCK_K"] == 16 and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert all((out[e] == 0).all() for e, n in enumerate(seg) if n == 0)


def test_grouped_swiglu_with_every_segment_empty_is_zero_with_zero_grads():
    ops, seg_E = _ffn_inputs(3, 16, 16, [0, 0, 0], 5, dtype=torch.float32)
    ops = [t.requires_grad_() for t in ops]
    y = _gs(*ops, seg_E)
    assert (y == 0).all()
    grads = torch.autograd.grad(y.sum(), ops)
    assert all((gr == 0).all() for gr in grads)


def test_grouped_swiglu_bf16_on_cpu_meets_the_rule():
    # The interpreter's tl.dot cannot multiply bf16; the CPU path computes in fp32 and casts back.
    ops64, seg_E = _ffn_inputs(3, 32, 16, [5, 0, 9], 2)
    ops_bf = [t.detach().bfloat16().requires_grad_() for t in ops64]
    y = _gs(*ops_bf, seg_E)
    assert y.dtype == torch.bfloat16
    assert_close_to_ref(y, grouped_swiglu_ref(*ops64, seg_E), grouped_swiglu_ref(*ops_bf, seg_E), floor=1e-5)
    assert all(gr.dtype == torch.bfloat16 for gr in torch.autograd.grad(y.sum(), ops_bf))


def test_grouped_swiglu_picks_triton_off_hopper_and_rejects_bad_arguments():
    (x, w1, w2, w3), seg_E = _ffn_inputs(2, 16, 24, [2, 2], 0, dtype=torch.float32)
    w13 = torch.stack((w1, w3), dim=1)
    assert grouped_swiglu_backend(x, w13, w2) == "triton"
    with pytest.raises(ValueError, match="backend"):
        grouped_swiglu(x, w13, w2, seg_E, backend="cutlass")
    with pytest.raises(ValueError, match="w2"):
        grouped_swiglu(x, w13, w2.transpose(1, 2), seg_E)
    with pytest.raises(ValueError, match=r"w13_E2ID \[E, 2, I, D\]"):
        grouped_swiglu(x, w1, w2, seg_E)
    with pytest.raises(ValueError, match="seg_E"):
        grouped_swiglu(x, w13, w2, seg_E.float())


# ----------------------------------------------------------------------------------------------- model
def _loss_and_grads(model, tokens, labels, impl):
    model.set_moe_impl(impl)
    model.zero_grad(set_to_none=True)
    out = model.compute_loss(tokens, labels)
    out.loss.backward()
    return out.loss.detach(), {
        n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }


def test_tiny_model_loss_and_grads_equal_ref_with_triton_moe():
    from r1core.model import Transformer

    args = presets["tiny"]
    model = Transformer(args)
    for m in model.moe_layers():  # a nonzero aux-free bias, so selection-only biasing is exercised
        if m.gate.e_score_correction_bias is not None:
            m.gate.e_score_correction_bias.normal_(0.0, 0.01)
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    labels = torch.randint(0, args.vocab_size, (2, 12))
    loss_ref, grads_ref = _loss_and_grads(model, tokens, labels, "ref")
    loss, grads = _loss_and_grads(model, tokens, labels, "triton")
    assert_close_to_ref(loss, loss_ref, floor=1e-5 * loss_ref.abs().item(), name="loss")
    assert grads.keys() == grads_ref.keys()
    for name, g_ref in grads_ref.items():  # both fp32: only a floor, scaled to the tensor
        assert_close_to_ref(grads[name], g_ref, floor=1e-5 * g_ref.abs().max().item() + 1e-9, name=name)


# ------------------------------------------------------------------------------------------------- GPU
# Each check takes its device, dtype and shapes, so the same code runs at the DeepSeek-V3 layer shape
# on the GPU (N=16384, H=7168, E=256, top-8, groups 8/4, expert inter 2048).
V3 = dict(T=16384, D=7168, E=256, K=8, I=2048)


def check_route_scores_bitwise(T, spec, device):
    """Unnormalised, unscaled weights are the gathered scores: bit-equal to torch's sigmoid."""
    # bf16-rounded like Gate.logits (a bf16 GEMM): many exactly tied logits per row
    logits = (torch.randn(T, spec.n_experts, device=device) * 2).bfloat16().float()
    bias = torch.randn(spec.n_experts, device=device) * 1e-3
    _check_route(logits, bias, spec)
    raw = RouterSpec(spec.n_experts, spec.top_k, spec.n_groups, spec.topk_groups, spec.score_func, 1.0, False)
    w, idx, _ = moe_route(logits, bias, raw)
    assert torch.equal(w, logits.sigmoid().gather(1, idx)), "kernel sigmoid differs from torch.sigmoid"


def check_permute_unpermute(T, K, E, D, pad, dtype, device):
    spec = RouterSpec(E, K, 1, 1, SIG, 1.0, True)
    _, idx, counts = moe_route_ref(torch.randn(T, E, device=device), None, spec)
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    x_PD, pos = moe_permute(x, idx, counts, pad)
    x_ref, pos_ref = moe_permute_ref(x, idx, counts, pad)
    assert torch.equal(pos, pos_ref) and torch.equal(x_PD, x_ref)
    g = torch.randn_like(x_PD)
    (gx,) = torch.autograd.grad(x_PD, x, g)
    (gx_ref,) = torch.autograd.grad(x_ref, x, g)
    assert_close_to_ref(gx, g.float()[pos].sum(dim=1), gx_ref, floor=1e-5, name="grad x_TD")
    del x_PD, x_ref, g, gx, gx_ref
    y = torch.randn(
        pos_ref.numel() + (E * (pad - 1) if pad > 1 else 0), D, device=device, dtype=dtype, requires_grad=True
    )
    w = torch.rand(T, K, device=device, requires_grad=True)
    out, out_ref = moe_unpermute(y, pos, w), moe_unpermute_ref(y, pos, w)
    gy = torch.randn_like(out)
    y32, gy32 = y.detach().float(), gy.float()
    out32 = torch.cat(
        [(y32[pos[t : t + 1024]] * w.detach()[t : t + 1024, :, None]).sum(1) for t in range(0, T, 1024)]
    )
    assert_close_to_ref(out, out32, out_ref, floor=1e-5, name="y_TD")
    grads, grads_ref = torch.autograd.grad(out, (y, w), gy), torch.autograd.grad(out_ref, (y, w), gy)
    gw64 = torch.cat(
        [
            (gy32[t : t + 1024, None].double() * y32[pos[t : t + 1024]].double()).sum(-1)
            for t in range(0, T, 1024)
        ]
    )
    gy32_PD = torch.zeros_like(y32).index_put_(
        (pos.flatten(),), (gy32[:, None] * w.detach()[..., None]).flatten(0, 1)
    )
    assert_close_to_ref(grads[0], gy32_PD, grads_ref[0], floor=1e-5, name="grad y_PD")
    assert_close_to_ref(grads[1], gw64, grads_ref[1], floor=1e-4, name="grad weights_TK")


def _expert_refs(x, w1, w2, w3, g, dtype):
    """One expert's SwiGLU FFN output and grads (x, w1, w2, w3) by PyTorch autograd in `dtype`."""
    ops = [t.detach().to(dtype).requires_grad_() for t in (x, w1, w2, w3)]
    y = (torch.nn.functional.silu(ops[0] @ ops[1].T) * (ops[0] @ ops[3].T)) @ ops[2].T
    return (y.detach(), *torch.autograd.grad(y, ops, g.to(dtype)))


def check_grouped_swiglu(T, K, E, D, I, backend, dtype, device, tail=64):
    """Router-shaped loads with two empty experts and one doubled; y, dx, dW per expert vs fp32 refs."""
    _, _, seg = moe_route_ref(torch.randn(T, E, device=device), None, RouterSpec(E, K, 1, 1, SIG, 1.0, True))
    seg[7] += seg[3] + seg[E - 5]
    seg[3] = seg[E - 5] = 0
    (x, w1, w2, w3), seg = _ffn_inputs(E, D, I, seg.tolist(), tail, dtype=dtype, device=device)
    ops = [t.requires_grad_() for t in (x, w1, w2, w3)]
    y = _gs(*ops, seg, backend=backend)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, ops, g)
    used = int(seg.sum())
    assert (y[used:] == 0).all() and (grads[0][used:] == 0).all()
    start = 0
    for e, n in enumerate(seg.tolist()):
        rows = slice(start, start + n)
        start += n
        if n == 0:
            assert all((gw[e] == 0).all() for gw in grads[1:]), (
                f"expert {e} has no rows but nonzero weight grads"
            )
            continue
        ref32 = _expert_refs(x[rows], w1[e], w2[e], w3[e], g[rows], torch.float32)
        ref_lp = _expert_refs(x[rows], w1[e], w2[e], w3[e], g[rows], dtype)
        outs = (y[rows], grads[0][rows], grads[1][e], grads[2][e], grads[3][e])
        for name, out, r32, rlp in zip(("y", "dx", "dw1", "dw2", "dw3"), outs, ref32, ref_lp):
            assert_close_to_ref(out, r32, rlp, floor=1e-5, name=f"{name} of expert {e} ({n} rows)")


def _rel_err(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def check_model_parity(args, B, T, device):
    """fp32: ref and triton agree to a floor. bf16: each is compared with the fp32 ref model, triton's
    relative error within twice the bf16 ref's (per tensor, by norm: bf16 can flip a near-tied
    routing decision in either implementation, which an elementwise max would turn into noise)."""
    from r1core.model import Transformer

    torch.manual_seed(0)
    model = Transformer(args).to(device)
    for m in model.moe_layers():
        if m.gate.e_score_correction_bias is not None:
            m.gate.e_score_correction_bias.normal_(0.0, 0.01)
    tokens = torch.randint(0, args.vocab_size, (B, T), device=device)
    labels = torch.randint(0, args.vocab_size, (B, T), device=device)
    loss32, grads32 = _loss_and_grads(model, tokens, labels, "ref")
    loss_t, grads_t = _loss_and_grads(model, tokens, labels, "triton")
    assert_close_to_ref(loss_t, loss32, floor=1e-5 * loss32.abs().item(), name="fp32 loss")
    for name, g32 in grads32.items():
        assert_close_to_ref(
            grads_t[name], g32, floor=1e-4 * g32.abs().max().item() + 1e-8, name=f"fp32 {name}"
        )
    model.to(torch.bfloat16)
    loss_lp, grads_lp = _loss_and_grads(model, tokens, labels, "ref")
    loss_t, grads_t = _loss_and_grads(model, tokens, labels, "triton")
    assert (
        abs(loss_t.item() - loss32.item()) <= 2 * abs(loss_lp.item() - loss32.item()) + 1e-3 * loss32.item()
    )
    for name, g32 in grads32.items():
        err, err_lp = _rel_err(grads_t[name], g32), _rel_err(grads_lp[name], g32)
        assert err <= 2 * err_lp + 1e-3, f"bf16 {name}: relative error {err:.3e} > 2 * {err_lp:.3e} + 1e-3"


@pytest.mark.gpu
def test_gpu_route_v3_layer_shape_exact_selection_bitwise_scores():
    check_route_scores_bitwise(V3["T"], RouterSpec.from_args(presets["v3"]), "cuda")


@pytest.mark.gpu
def test_gpu_route_softmax_without_groups_exact_selection():
    _check_route(torch.randn(V3["T"], 64, device="cuda") * 2, None, RouterSpec(64, 6, 1, 1, SOFT, 1.0, False))


@pytest.mark.gpu
@pytest.mark.parametrize("pad", [1, 128])
def test_gpu_permute_unpermute_v3_layer_shape_bf16(pad):
    check_permute_unpermute(V3["T"], V3["K"], V3["E"], V3["D"], pad, torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["grouped_mm", "grouped_mm_tma", "triton"])
def test_gpu_grouped_swiglu_v3_layer_shape_bf16(backend):
    check_grouped_swiglu(V3["T"], V3["K"], V3["E"], V3["D"], V3["I"], backend, torch.bfloat16, "cuda")


@pytest.mark.gpu
def test_gpu_small_preset_model_parity_ref_vs_triton():
    # One dense layer, then one MoE layer: both impls route from bit-identical fp32 logits, so the
    # fp32 comparison never meets a routing flip caused by an earlier layer's rounding.
    check_model_parity(presets["small"].replace(n_layers=2, n_mtp_modules=0), 2, 512, "cuda")
