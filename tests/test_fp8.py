"""FP8 training GEMMs (r1core.kernels.fp8, model.precision=fp8) against float references.

CPU: quantize/dequantize and the tile orientation of every GEMM against per-tile loops in fp32; the
Triton kernels under TRITON_INTERPRET=1 against the dequantize-then-matmul reference; a tiny model's
training loss and gradients in fp8 against the same model in fp32.
GPU: torch's scaled_mm (cuBLASLt blockwise) and the Triton kernels against the reference at DeepSeek-V3
shapes, with the tolerance rule: error vs fp32 at most twice the reference emulation's, plus a floor.
"""

import pytest
import torch
import torch.nn.functional as F

from r1core.kernels import fp8
from r1core.model import Transformer, presets
from r1core.model.precision import Fp8GroupedExperts, Fp8Linear

E4M3 = torch.float8_e4m3fn
INV_448 = torch.tensor(1 / 448, dtype=torch.float32)  # scales are amax * fp32(1/448)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _rel_max(a, b):
    return ((a.float() - b.float()).abs() / b.float().abs().clamp(min=1e-30)).max().item()


def test_quantize_rows_scales_each_1x128_tile_by_its_amax():
    x = torch.randn(3, 5, 256) * torch.logspace(-3, 3, 256)  # tiles of very different magnitude
    q, s = fp8.quantize_rows(x)
    assert q.dtype == E4M3 and s.shape == (3, 5, 2) and s.dtype == torch.float32
    for t in range(2):
        tile = x[..., t * 128 : (t + 1) * 128]
        s_ref = tile.abs().amax(-1) * INV_448
        torch.testing.assert_close(s[..., t], s_ref, rtol=0, atol=0)
        assert torch.equal(
            q[..., t * 128 : (t + 1) * 128].float(), (tile / s_ref[..., None]).to(E4M3).float()
        )
    # dequantized values are x rounded to e4m3 (3 mantissa bits): relative error <= 2^-4, plus subnormals
    err = (fp8.dequantize_rows(q, s) - x).abs()
    bound = x.abs() * 2**-4 + s.repeat_interleave(128, -1) * 2**-10
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}"


def test_quantize_blocks_scales_each_128x128_block_and_transposes_exactly():
    w = torch.randn(256, 384)
    w[3, 200] = 1e3  # an outlier spoils only its own block
    q, s = fp8.quantize_blocks(w)
    assert s.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            blk = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            assert s[i, j] == blk.abs().amax() * INV_448
    assert s[0, 1] > 100 * s[1, 1]
    assert _rel(fp8.dequantize_blocks(q, s)[128:], w[128:]) < 0.03
    # dgrad reuses the forward's quantized weight: the transposed blocks are the blocks of the transpose
    qt, st = fp8.quantize_blocks(w.t())
    assert torch.equal(qt.float(), q.t().float()) and torch.equal(st, s.t())


def test_quantizer_scales_round_alike_on_every_device():
    """Scales are amax times fp32(1/448), one correctly rounded product: torch's CUDA division by a Python
    scalar multiplies by that reciprocal while its CPU division divides, so `amax / 448` differed between
    the devices' references in the last bit of about half the scales (and then in some e4m3 values)."""
    torch.manual_seed(0)
    x = torch.randn(64, 1024) * torch.logspace(-3, 3, 1024)
    amax = x.reshape(64, 8, 128).abs().amax(-1)
    _, s = fp8.quantize_rows(x)
    assert torch.equal(s, amax * INV_448)  # INV_448: what CUDA's x / 448 multiplies by
    w = torch.randn(256, 384) * 7
    _, s = fp8.quantize_blocks(w)
    assert torch.equal(s, w.reshape(2, 128, 3, 128).abs().amax(dim=(1, 3)) * INV_448)


def test_quantizers_name_the_bad_dim():
    with pytest.raises(ValueError, match="divisible by 128, got 200"):
        fp8.quantize_rows(torch.randn(4, 200))
    with pytest.raises(ValueError, match="128x128 blocks .* got 200x256"):
        fp8.quantize_blocks(torch.randn(200, 256))


@pytest.mark.parametrize("b_rows", [False, True])
def test_triton_blockwise_gemm_matches_reference(b_rows):
    from r1core.kernels._fp8_triton import fp8_gemm_triton

    a_q, a_s = fp8.quantize_rows(torch.randn(200, 384))  # M not a multiple of the tile
    b = torch.randn(256, 384)
    b_q, b_s = fp8.quantize_rows(b) if b_rows else fp8.quantize_blocks(b)
    ref = fp8.blockwise_gemm_ref(a_q, a_s, b_q, b_s, torch.float32)
    out = fp8_gemm_triton(a_q, a_s, b_q, b_s, torch.float32)
    assert _rel(out, ref) < 1e-6, f"max {(out - ref).abs().max():.3g}"


def test_fused_quantizers_write_the_reference_values_in_one_pass():
    """The Triton pass that writes both tilings of x (and both orientations of W) equals the reference bit
    for bit: scales, e4m3 rounding (ties to even, subnormals, values rounding up a binade), zero padding."""
    torch.manual_seed(0)
    x = torch.randn(200, 256) * torch.logspace(-3, 3, 256)
    x[5, :128] = 0  # an all-zero tile
    x[7, 128:] = torch.linspace(-448, 448, 128)  # scale 1: exact grid points and ties
    x[9, :128] = torch.tensor([125.0, 84.0, 0.003] * 42 + [448.0, 1.0])  # up a binade, a tie, a subnormal
    for got, ref in zip(fp8.quantize_dual(x, "triton"), fp8.quantize_dual(x, "ref")):
        assert got.shape == ref.shape and torch.equal(got.float(), ref.float())
    w = torch.randn(2, 256, 384)
    w[1, 3, 200] = 1e3
    for got, ref in zip(fp8.quantize_blocks_t(w, "triton"), fp8.quantize_blocks_t(w, "ref")):
        assert torch.equal(got.float(), ref.float())


def test_fp8_linear_triton_quantizers_match_reference_linear():
    x = torch.randn(3, 70, 256, requires_grad=True)
    w = (torch.randn(384, 256) * 0.05).requires_grad_()
    dy = torch.randn(3, 70, 384)
    res = []
    for impl in ("ref", "triton"):
        x.grad = w.grad = None
        y = fp8.fp8_linear(x, w, impl)
        y.backward(dy)
        res.append((y.detach(), x.grad, w.grad))
    for name, r, t in zip(("y", "dx", "dw"), *res):
        assert _rel(t, r) < 1e-5, f"{name}: max {(t - r).abs().max():.3g}"


def test_fp8_linear_compiles_as_one_graph_with_its_backward():
    """The fp8 GEMMs are custom ops: torch.compile traces them without a graph break (fullgraph), forward and
    backward give the eager values."""
    x = torch.randn(2, 64, 256, requires_grad=True)
    w = (torch.randn(128, 256) * 0.05).requires_grad_()

    def f(x_, w_):
        return F.silu(fp8.fp8_linear(x_ * 2, w_, "ref")).sum()

    grads = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        x.grad = w.grad = None
        fn(x, w).backward()
        grads.append((x.grad.clone(), w.grad.clone()))
    for g_eager, g_comp in zip(*grads):
        torch.testing.assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-6)


def test_fp8_dense_keeps_routed_experts_in_bf16():
    args = presets["tiny"].replace(moe_inter_dim=128, q_lora_rank=128, n_mtp_modules=0, precision="fp8_dense")
    model = Transformer(args)
    experts = model.layers["1"].ffn.experts
    assert type(experts).__name__ == "GroupedExperts" and not isinstance(experts, Fp8GroupedExperts)
    assert isinstance(model.layers["0"].attn.wo, Fp8Linear)
    assert model.layers["1"].ffn.dispatcher.pad_multiple == 1  # no 128-row padding for bf16 experts


def test_fp8_linear_tiles_each_gemm_along_its_reduction_dim():
    """Forward 1x128 x along K with 128x128 W; dgrad 1x128 dy along N; wgrad 128x1 dy and x along tokens."""
    x = torch.randn(2, 100, 256, requires_grad=True)  # 200 tokens: wgrad pads them to 256 with zeros
    w = torch.randn(384, 256, requires_grad=True)
    y = fp8.fp8_linear_ref(x, w)
    dy = torch.randn_like(y)
    y.backward(dy)
    deq_rows = lambda t: fp8.dequantize_rows(*fp8.quantize_rows(t))  # noqa: E731
    w_d = fp8.dequantize_blocks(*fp8.quantize_blocks(w.detach()))
    x2, dy2 = x.detach().reshape(-1, 256), dy.reshape(-1, 384)
    torch.testing.assert_close(y.detach().reshape(-1, 384), deq_rows(x2) @ w_d.T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad.reshape(-1, 256), deq_rows(dy2) @ w_d, rtol=1e-5, atol=1e-4)
    dy_t, x_t = fp8._pad_rows(dy2).T, fp8._pad_rows(x2).T  # zero tokens 200..255
    torch.testing.assert_close(w.grad, deq_rows(dy_t) @ deq_rows(x_t).T, rtol=1e-5, atol=1e-4)
    # and all three stay close to the fp32 GEMMs
    assert _rel(y.detach(), x.detach() @ w.detach().T) < 0.05
    assert _rel(w.grad, dy2.T @ x2) < 0.05


def _grouped_case(P=512, D=128, n_out=256, seg=(128, 0, 256)):
    seg_E = torch.tensor(seg)
    x = torch.randn(P, D)
    x[sum(seg) :] = 0  # rows past the last segment are zero by contract
    w = torch.randn(len(seg), n_out, D) * 0.05
    return x, w, seg_E


def test_grouped_linear_fp8_triton_matches_per_expert_reference():
    x, w, seg_E = _grouped_case()
    dy = torch.randn(x.shape[0], w.shape[1])
    outs = []
    for impl in ("ref", "triton"):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8.grouped_linear_fp8(xi, wi, seg_E, impl)
        y.backward(dy)
        outs.append((y.detach(), xi.grad, wi.grad))
    for name, r, t in zip(("y", "dx", "dw"), *outs):
        assert _rel(t, r) < 1e-5, f"{name}: max {(t - r).abs().max():.3g}"
    y_ref, dx_ref, dw_ref = outs[0]
    assert y_ref[384:].abs().max() == 0 and dw_ref[1].abs().max() == 0  # padding rows, the empty expert
    assert _rel(y_ref[128:384], x[128:384] @ w[2].T) < 0.05


def _mm_shapes(fn, probe=None):
    """Run fn; return (its result, per matmul it issued: its operand shapes, or probe() at that moment)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []
    mm_ops = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in mm_ops:
                shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
                seen.append(probe() if probe else shapes)
            return func(*args, **(kwargs or {}))

    with Record():
        out = fn()
    return out, seen


def test_grouped_reference_rows_do_not_depend_on_other_rows_or_segment_sizes():
    """Issue 19: a GEMM library picks its kernel by shape, so a reference that ran one GEMM per expert segment
    gave a row different last bits when other tokens changed the segment's length (on an H100; the CPU's
    GEMMs happen to be row-invariant, so the shape check is what fails there). The same 128 rows of expert 2
    must give the same bits with another tile beside them or with 384 other rows in expert 0 before them,
    and every GEMM the reference issues has one shape, [128, K] x [K, N]."""
    g = torch.Generator().manual_seed(0)
    ours, others = torch.randn(128, 256, generator=g), torch.randn(384, 256, generator=g)
    w = torch.randn(3, 256, 256, generator=g) * 0.05
    x_a = torch.cat([others[:128], ours, others[128:256]])  # expert 0: 128 rows, expert 2: ours + 128
    x_b = torch.cat([others, ours])  # expert 0: 384 rows, expert 2: ours
    with torch.no_grad():
        y_a, shapes_a = _mm_shapes(lambda: fp8.grouped_linear_fp8(x_a, w, torch.tensor([128, 0, 256]), "ref"))
        y_b, shapes_b = _mm_shapes(lambda: fp8.grouped_linear_fp8(x_b, w, torch.tensor([384, 0, 128]), "ref"))
    assert {s[0] for s in shapes_a + shapes_b} == {(128, 256)}, f"GEMM shapes {shapes_a} / {shapes_b}"
    assert len(shapes_a) == 3 and len(shapes_b) == 4  # one GEMM per tile
    assert torch.equal(y_a[128:256], y_b[384:512])
    assert _rel(y_b[384:512], ours @ w[2].T) < 0.05


def test_reference_gemms_run_in_ieee_fp32_when_the_caller_allows_tf32():
    """TF32 would round the dequantized operands to 10 mantissa bits: the specification pins IEEE fp32 for
    its own GEMMs and hands the caller's setting back (the CPU backend's flag stands in for cuBLAS's)."""
    flags = torch.backends.mkldnn.matmul
    x, w, seg_E = _grouped_case()
    a_q, a_s = fp8.quantize_rows(x)
    b_q, b_s = fp8.quantize_blocks(w[0])
    prev = flags.fp32_precision
    flags.fp32_precision = "tf32"
    try:
        _, during = _mm_shapes(
            lambda: fp8.blockwise_gemm_ref(a_q, a_s, b_q, b_s), lambda: flags.fp32_precision
        )
        with torch.no_grad():
            _, during_grouped = _mm_shapes(
                lambda: fp8.grouped_linear_fp8(x, w, seg_E, "ref"), lambda: flags.fp32_precision
            )
        after = flags.fp32_precision
    finally:
        flags.fp32_precision = prev
    assert during == ["ieee"] and set(during_grouped) == {"ieee"} and after == "tf32"


def _tiny_all_fp8(**kw):
    """A CPU-sized model whose every GEMM that can be fp8 is (dims multiples of 128, experts included);
    as in the small preset only wkv_a (kv_lora_rank + rope dim outputs) keeps its bf16 GEMM."""
    return presets["tiny"].replace(
        moe_inter_dim=128, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=32,
        v_head_dim=32, n_mtp_modules=0, precision="fp8", **kw,
    )  # fmt: skip


def _earlier_and_later_change(model, vocab, dev, batch=2, seq=256):
    """Change tokens from seq/2 on: (max |dlogit| before seq/2, after it, how many MoE layers' segment sizes
    changed): a causal model gives exactly 0 before, whatever the re-routing of the later tokens."""
    g = torch.Generator(device=dev).manual_seed(1)
    tok = torch.randint(0, vocab, (batch, seq), device=dev, generator=g)
    tok2 = tok.clone()
    tok2[:, seq // 2 :] = torch.randint(0, vocab, (batch, seq - seq // 2), device=dev, generator=g)
    segs = {}  # the MTP block's MoE does not run in forward(): key by module, one entry per forward
    experts = [m.experts for m in model.moe_layers()]
    hook = lambda m, i, o: segs.setdefault(m, []).append(i[1].clone())  # noqa: E731
    hooks = [e.register_forward_hook(hook) for e in experts]
    with torch.no_grad():
        a, b = model(tok).float(), model(tok2).float()
    for h in hooks:
        h.remove()
    changed = sum(not torch.equal(x, y) for x, y in segs.values())
    t = seq // 2
    return (a[:, :t] - b[:, :t]).abs().max().item(), (a[:, t:] - b[:, t:]).abs().max().item(), changed


def test_fp8_reference_model_logits_are_causal_bit_for_bit():
    torch.manual_seed(0)
    model = Transformer(_tiny_all_fp8()).bfloat16()
    linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert all(n == "head" or n.endswith("attn.wkv_a") for n in linears), linears
    assert all(isinstance(m.experts, Fp8GroupedExperts) for m in model.moe_layers())
    earlier, later, seg_changed = _earlier_and_later_change(model, 512, torch.device("cpu"))
    assert seg_changed > 0 and later > 0  # the later tokens did re-route: segment sizes moved
    assert earlier == 0, f"max |dlogit| {earlier:.3g} at positions before the change"


def test_fp8_experts_reject_segments_not_padded_to_128_rows():
    with pytest.raises(RuntimeError, match="padded to 128 rows"):
        fp8.grouped_linear_fp8(
            torch.randn(256, 128), torch.randn(2, 128, 128), torch.tensor([100, 128]), "ref"
        )


def test_fp8_model_trains_like_fp32():
    args = presets["tiny"].replace(moe_inter_dim=128, q_lora_rank=128, n_mtp_modules=0)
    torch.manual_seed(0)
    ref = Transformer(args)
    model = Transformer(args.replace(precision="fp8"))
    model.load_state_dict(ref.state_dict())
    assert isinstance(model.layers["1"].ffn.experts, Fp8GroupedExperts)
    assert isinstance(model.layers["0"].attn.wo, Fp8Linear) and type(model.head) is torch.nn.Linear
    tokens = torch.randint(0, args.vocab_size, (2, 64))
    losses = []
    for m in (ref, model):
        loss = F.cross_entropy(m(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        losses.append(loss.detach())
    assert abs(losses[1] - losses[0]) < 0.01 * losses[0]
    # Per-GEMM errors of a few % (e4m3 keeps 3 mantissa bits) flip some routing choices in a random
    # model, so single experts' gradients differ a lot; the whole gradient must still point the same way.
    grads = [
        torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]) for m in (ref, model)
    ]
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.95


def test_fp8_model_starts_where_bf16_does():
    """Same seed: the fp8 model has bf16's parameters bit for bit, the same optimizer groups (conversion swaps
    classes, it re-draws and re-registers nothing) and, on one batch, the same CE, MTP CE and balance loss
    up to fp8 rounding: what a bf16 vs fp8 loss comparison relies on."""
    from r1core.parallel.optim import param_groups

    args = presets["tiny"].replace(moe_inter_dim=128, q_lora_rank=128)
    models = []
    for precision in ("bf16", "fp8"):
        torch.manual_seed(0)
        models.append(Transformer(args.replace(precision=precision)))
    assert isinstance(models[1].layers["1"].ffn.experts, Fp8GroupedExperts)
    named = [list(m.named_parameters()) for m in models]
    assert [n for n, _ in named[0]] == [n for n, _ in named[1]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(*named))
    groups = [
        [[n for n, p in nps if any(p is q for q in g["params"])] for g in param_groups(nps, 0.1)]
        for nps in named
    ]
    assert groups[0] == groups[1]
    tokens = torch.randint(0, args.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    bf16, fp8_ = (m.compute_loss(tokens[:, :-1], tokens[:, 1:]) for m in models)
    for a, b in [(bf16.ce, fp8_.ce), *zip(bf16.mtp, fp8_.mtp)]:
        assert abs(b - a) < 0.01 * a
    assert abs(fp8_.aux - bf16.aux) < 0.05 * bf16.aux


# ----------------------------------------------------------------------------------------- GPU


def _tolerance_check(out, ref_emul, exact, floor=1e-3):
    """Tolerance rule: |out - fp32| <= 2 |emulation - fp32| + floor (relative Frobenius norms)."""
    err, ref_err = _rel(out, exact), _rel(ref_emul, exact)
    assert err <= 2 * ref_err + floor, f"error {err:.3g} vs reference emulation {ref_err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(4096, 7168, 2048), (8192, 2048, 768), (1000, 1536, 3072)])
def test_blockwise_gemm_gpu_matches_reference(impl, shape):
    M, K, N = shape
    dev = torch.device("cuda")
    if impl == "torch" and not fp8.torch_blockwise_supported(0, False):
        # this torch/GPU has no blockwise scaled_mm: the dense layers must then fall back to Triton
        assert fp8.backend(dev, False) == "triton"
        return
    a, b = torch.randn(M, K, device=dev), torch.randn(N, K, device=dev) * 0.02
    for b_rows in (False, True):
        a_q, a_s = fp8.quantize_rows(a)
        b_q, b_s = fp8.quantize_rows(b) if b_rows else fp8.quantize_blocks(b)
        out = fp8.blockwise_gemm(a_q, a_s, b_q, b_s, torch.bfloat16, impl)
        emul = fp8.blockwise_gemm_ref(a_q, a_s, b_q, b_s, torch.float32)
        _tolerance_check(out, emul.bfloat16(), a @ b.T)
        assert _rel(out, emul) < 1e-2


@pytest.mark.gpu
def test_fused_quantizers_gpu_match_reference_bit_for_bit():
    dev = torch.device("cuda")
    x = (torch.randn(8000, 7168, device=dev) * torch.logspace(-3, 3, 7168, device=dev)).bfloat16()
    names = ("q", "s", "qt", "st")
    for name, got, ref in zip(names, fp8.quantize_dual(x, "triton"), fp8.quantize_dual(x, "ref")):
        diff = got.float() != ref.float()
        assert not diff.any(), (
            f"x {name}: {int(diff.sum())} of {diff.numel()} differ, max rel {_rel_max(got, ref):.3g}"
        )
    w = torch.randn(4, 2048, 7168, device=dev, dtype=torch.bfloat16)
    outs = fp8.quantize_blocks_t(w, "triton"), fp8.quantize_blocks_t(w, "ref")
    for name, got, ref in zip(("q", "s", "qt"), *outs):
        diff = got.float() != ref.float()
        assert not diff.any(), (
            f"w {name}: {int(diff.sum())} of {diff.numel()} differ, max rel {_rel_max(got, ref):.3g}"
        )


@pytest.mark.gpu
def test_fp8_linear_and_grouped_gpu_grads_match_reference():
    dev = torch.device("cuda")
    x = torch.randn(8192, 2048, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(768, 2048, device=dev) * 0.02).bfloat16()
    dy = torch.randn(8192, 768, device=dev, dtype=torch.bfloat16)
    res = {}
    for impl in ("ref", None):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8.fp8_linear(xi, wi, impl)
        y.backward(dy)
        res[impl] = (y, xi.grad, wi.grad)
    exact = (x.float() @ w.float().T, dy.float() @ w.float(), dy.float().T @ x.float())
    for got, emul, ex in zip(res[None], res["ref"], exact):
        _tolerance_check(got, emul, ex)
    seg = torch.tensor([1024, 0, 2048, 512, 128], device=dev)
    xg = torch.randn(4096, 2048, device=dev, dtype=torch.bfloat16)
    xg[3712:] = 0
    wg = (torch.randn(5, 768, 2048, device=dev) * 0.02).bfloat16()
    outs = []
    for impl in ("ref", "triton"):
        xi, wi = xg.clone().requires_grad_(), wg.clone().requires_grad_()
        y = fp8.grouped_linear_fp8(xi, wi, seg, impl)
        y.backward(torch.ones_like(y))
        outs.append((y, xi.grad, wi.grad))
    for r, t in zip(*outs):
        assert _rel(t, r) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["ref", None])
def test_fp8_small_preset_logits_are_causal_bit_for_bit_gpu(impl):
    """Issue 19 at the shapes where it showed (small preset, bf16, B2 x T512): changing later tokens re-routes
    them, which must leave earlier logits bit-identical on the reference (2.77 before the per-tile fix) and
    on the training path (None: scaled_mm / Triton)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    with dev:
        model = Transformer(presets["small"].replace(precision="fp8", moe_impl="triton")).bfloat16()
    if impl:
        for m in model.modules():
            if isinstance(m, (Fp8Linear, Fp8GroupedExperts)):
                m.fp8_impl = impl
    earlier, later, seg_changed = _earlier_and_later_change(model, model.args.vocab_size, dev, 2, 512)
    assert seg_changed > 0 and later > 0
    assert earlier == 0, f"max |dlogit| {earlier:.3g} at positions before the change"
