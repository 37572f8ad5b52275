"""r1core's AdamW kernel (r1core.kernels.adamw) against its readable reference and torch's fused AdamW, and
in the engine: fp32 masters folded into the kernel, BF16 moments, the graph-ready step's device-side skip.
On the CPU the kernel runs under TRITON_INTERPRET."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from r1core.kernels.adamw import TritonAdamW, adamw_step_, adamw_step_ref, multi_tensor_ok, sum_of_squares
from r1core.model import presets
from r1core.model.transformer import Transformer
from r1core.parallel import ParallelConfig
from r1core.parallel.optim import MasterWeights
from r1core.train.engine import LocalEngine, OptimConfig
from r1core.train.objectives import LMObjective

HYPER = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _is_rounding_of(low: torch.Tensor, master: torch.Tensor) -> bool:
    """`low` is `master` rounded to bf16: exactly (round to nearest even) on the GPU; within one bf16 step on
    the CPU, where Triton's interpreter truncates float32 -> bfloat16 casts."""
    if low.is_cuda:
        return torch.equal(low, master.detach().to(low.dtype))
    return bool(
        ((low.float() - master.detach()).abs() <= torch.finfo(low.dtype).eps * master.detach().abs()).all()
    )


def _assert_within_rounding(got, want, old, name="", terms=None):
    """The same fp32 math in another order: a few roundings of the stored dtype at the larger of the values
    before and after (on the GPU, fused multiply-adds round once where torch rounds twice: 2 ulps, which is
    4 eps at a binade's lower edge), plus a few of the update's own (a sqrt, two divisions, a product).
    `terms`: the update computed from the magnitudes of its terms, where they may cancel (the first moment
    beta1 m + (1 - beta1) g): its roundings are relative to the terms, not to the result."""
    err, eps, old = (got.float() - want.float()).abs(), torch.finfo(got.dtype).eps, old.float()
    update = (want.float() - old).abs() if terms is None else torch.maximum((want.float() - old).abs(), terms)
    tol = 4 * eps * torch.maximum(want.float().abs(), old.abs()) + 4 * eps * update + 1e-12
    if not (err <= tol).all():
        i = int((err - tol).argmax())
        raise AssertionError(
            f"{name}: max err {err.max():.3g}, mean {err.mean():.3g}; worst at {i}: "
            f"got {got.flatten()[i]:.9g}, want {want.flatten()[i]:.9g}, before {old.flatten()[i]:.9g}, "
            f"tolerance {tol.flatten()[i]:.3g}"
        )


def _tensors(n, p_dtype, g_dtype, m_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g).to(p_dtype)
    grad = (torch.randn(n, generator=g) * 0.1).to(g_dtype)
    m = (torch.randn(n, generator=g) * 0.01).to(m_dtype)
    v = (torch.rand(n, generator=g) * 1e-3).to(m_dtype)
    return p, grad, m, v


@pytest.mark.parametrize(
    "p_dtype,g_dtype,m_dtype,out",
    [
        (torch.float32, torch.float32, torch.float32, False),  # fp32 training
        (torch.bfloat16, torch.bfloat16, torch.bfloat16, False),  # pure bf16 (no masters)
        (torch.float32, torch.bfloat16, torch.float32, True),  # fp32 masters folded in
        (torch.float32, torch.bfloat16, torch.bfloat16, True),  # DeepSeek-V3: masters + BF16 moments
    ],
)
@pytest.mark.parametrize("n,step,scaled", [(1, 1, False), (1000, 3, True), (4099, 250, True)])
def test_adamw_kernel_matches_the_fp32_reference_update(p_dtype, g_dtype, m_dtype, out, n, step, scaled):
    p, grad, m, v = _tensors(n, p_dtype, g_dtype, m_dtype, seed=n + step)
    p_ref, m_ref, v_ref = p.clone(), m.clone(), v.clone()
    before = {"param": p.clone(), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    model = torch.empty(n, dtype=torch.bfloat16) if out else None
    model_ref = torch.empty(n, dtype=torch.bfloat16) if out else None
    kw = dict(HYPER, grad_scale=torch.tensor(2.5) if scaled else None, out=model)
    st, lr = torch.tensor(float(step)), torch.tensor(3e-3)
    adamw_step_(p, grad, m, v, st, lr, **kw)
    adamw_step_ref(p_ref, grad, m_ref, v_ref, st, lr, **{**kw, "out": model_ref})
    for name, got, want in (("param", p, p_ref), ("exp_avg", m, m_ref), ("exp_avg_sq", v, v_ref)):
        _assert_within_rounding(got, want, before[name], name)
    if out:
        assert _is_rounding_of(model, p)  # the model copy is the master, rounded once


def test_adamw_kernel_with_found_inf_moves_nothing():
    p, grad, m, v = _tensors(300, torch.float32, torch.bfloat16, torch.float32, seed=0)
    model = torch.zeros(300, dtype=torch.bfloat16)
    before = [t.clone() for t in (p, m, v, model)]
    grad[7] = float("nan")
    adamw_step_(
        p, grad, m, v, torch.tensor(1.0), torch.tensor(1e-3), **HYPER, found_inf=torch.tensor(1.0), out=model
    )
    for b, a in zip(before, (p, m, v, model)):
        assert torch.equal(a, b)


def _pair(params, **kw):
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]  # noqa: E731
    a = [p.clone().requires_grad_() for p in params]
    b = [p.clone().requires_grad_() for p in params]
    return a, b, torch.optim.AdamW(groups(a), fused=True, **kw), TritonAdamW(groups(b), **kw)


def test_triton_adamw_steps_like_torch_fused_adamw_with_clip_skip_and_state_dict():
    # the clip's inverse factor (grad_scale), a skipped step (found_inf: no update, the step count kept),
    # a device learning rate; then the state moves between the two optimizers and both carry on alike
    params = [torch.randn(37, 5), torch.randn(1000), torch.randn(3)]
    a, b, torch_opt, ours = _pair(params, lr=torch.tensor(1e-2), betas=(0.9, 0.95))
    for it in range(5):
        grads = [torch.randn_like(p) for p in params]
        for x, y, g in zip(a, b, grads):
            x.grad, y.grad = g.clone(), g.clone()
        for opt in (torch_opt, ours):
            opt.grad_scale, opt.found_inf = torch.tensor(1.7), torch.tensor(float(it == 2))
            opt.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)
    assert {float(s["step"]) for s in ours.state.values()} == {4.0}
    sd = ours.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    fresh = [p.detach().clone().requires_grad_() for p in b]
    back = torch.optim.AdamW(
        [{"params": fresh[:2], "weight_decay": 0.1}, {"params": fresh[2:], "weight_decay": 0.0}], fused=True
    )
    back.load_state_dict(copy.deepcopy(sd))  # a copy: torch's load keeps tensors that need no cast
    grads = [torch.randn_like(p) for p in params]
    for x, y, g in zip(fresh, b, grads):
        x.grad, y.grad = g.clone(), g.clone()
    ours.grad_scale = ours.found_inf = None
    back.step()
    ours.step()
    for x, y in zip(fresh, b):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)


def test_triton_adamw_on_cpu_parameters_without_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="optim.implementation=triton steps CUDA parameters"):
        TritonAdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)


def test_bf16_moments_stay_bf16_through_load_state_dict_and_track_fp32_moments():
    params = [torch.randn(64, 8), torch.randn(100), torch.randn(4)]
    ref = [p.clone().requires_grad_() for p in params]
    low = [p.clone().requires_grad_() for p in params]
    opt_ref, opt_low = TritonAdamW(ref, lr=1e-2), TritonAdamW(low, lr=1e-2, bf16_moments=True)
    for _ in range(10):
        grads = [torch.randn_like(p) for p in params]
        for x, y, g in zip(ref, low, grads):
            x.grad, y.grad = g.clone(), g.clone()
        opt_ref.step()
        opt_low.step()
    assert all(
        st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.bfloat16 for st in opt_low.state.values()
    )
    drift = max((x - y).abs().max().item() for x, y in zip(ref, low))
    moved = min((x - p).abs().max().item() for x, p in zip(ref, params))
    assert drift < 0.02 * moved, (drift, moved)  # BF16 moments change 10 updates of ~1e-2 by under 2 %
    opt_low.load_state_dict(opt_low.state_dict())
    assert all(st["exp_avg"].dtype == torch.bfloat16 for st in opt_low.state.values())


def test_sources_fold_the_master_copies_into_the_update():
    # TritonAdamW stepping fp32 masters from the bf16 model gradients and writing the rounded weights
    # equals MasterWeights' copy in, torch's fused AdamW on the masters, and the copy out
    named = [
        (f"w{i}", torch.randn(s).to(torch.bfloat16).requires_grad_()) for i, s in enumerate((50, 7, 300))
    ]
    twin = [(n, p.detach().clone().requires_grad_()) for n, p in named]
    plain, folded = MasterWeights(named), MasterWeights(twin)
    torch_opt = torch.optim.AdamW([m for _, m in plain.named], lr=1e-3, fused=True)
    ours = TritonAdamW([m for _, m in folded.named], lr=1e-3, sources=folded.sources())
    for _ in range(3):
        for (_, p), (_, q) in zip(named, twin):
            p.grad = torch.randn_like(p.float()).to(torch.bfloat16)
            q.grad = p.grad.clone()
        plain.grads_in()
        torch_opt.step()
        plain.weights_out()
        ours.step()
    for (_, m1), (_, m2), (_, p), (_, q) in zip(plain.named, folded.named, named, twin):
        torch.testing.assert_close(m2, m1, rtol=1e-6, atol=1e-7)
        assert _is_rounding_of(q, m2) and m2.grad is None  # no fp32 gradient allocated


def _mixed_masters(seed):
    """fp32 masters of bf16 model tensors of several sizes (8200: two whole blocks and a part), one of a size
    that is not a multiple of 8, and one that starts 4 bytes into its storage (not 16-byte aligned): the
    multi-tensor kernel leaves those two to the per-tensor one."""
    g = torch.Generator().manual_seed(seed)
    masters = [torch.randn(n, generator=g) for n in (8, 8200, 4104, 1, 296)]
    masters.append(torch.randn(65, generator=g)[1:])
    assert [multi_tensor_ok(m) for m in masters] == [True, True, True, False, True, False]
    model = [m.to(torch.bfloat16).requires_grad_() for m in masters]
    return [m.requires_grad_() for m in masters], model


@pytest.mark.parametrize("bf16_moments", [False, True])
def test_one_launch_for_all_tensors_steps_them_as_one_launch_each(bf16_moments):
    # the multi-tensor launch (a table of addresses, a binary search for each block's tensor) against the
    # per-tensor kernel: bit for bit, over fresh gradient tensors each step (new addresses: the tables are
    # rebuilt), two parameter groups, the clip factor and a skipped step
    runs = []
    for multi in (True, False):
        masters, model = _mixed_masters(seed=0)
        groups = [{"params": masters[:3], "weight_decay": 0.1}, {"params": masters[3:], "weight_decay": 0.0}]
        opt = TritonAdamW(
            groups,
            lr=1e-2,
            sources=dict(zip(masters, model)),
            bf16_moments=bf16_moments,
            multi_tensor=multi,
        )
        g = torch.Generator().manual_seed(1)
        for it in range(4):
            for p in model:
                p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
            opt.grad_scale, opt.found_inf = torch.tensor(1.3), torch.tensor(float(it == 2))
            opt.step()
        runs.append((masters, model, opt))
    (m1, p1, o1), (m2, p2, o2) = runs
    for a, b in zip(m1 + p1, m2 + p2):
        assert torch.equal(a, b)
    for a, b in zip(m1, m2):
        s1, s2 = o1.state[a], o2.state[b]
        assert all(torch.equal(s1[k], s2[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
        assert float(s1["step"]) == 3.0
    before = [m.clone() for m in m1]  # one more step moves every weight: the launch is not a no-op
    o1.grad_scale = o1.found_inf = None
    o1.step()
    assert all(not torch.equal(a, b) for a, b in zip(m1, before))


def test_sum_of_squares_matches_float64_and_follows_new_tensors():
    # a bf16 and an fp32 list in one launch each, a strided tensor and one of 1 element through _foreach_norm;
    # then new tensors of the same shapes (a rebuilt address table, not the cached one)
    def tensors(seed):
        g = torch.Generator().manual_seed(seed)
        ts = [torch.randn(n, generator=g).to(dt) for n, dt in ((1, torch.bfloat16), (5000, torch.bfloat16))]
        ts += [torch.randn(296, generator=g) * 3, torch.randn(40, 30, generator=g).t()]
        return ts

    for seed in (0, 1):
        ts = tensors(seed)
        want = sum(float(t.double().square().sum()) for t in ts)
        assert float(sum_of_squares(ts)) == pytest.approx(want, rel=1e-5)


def _engine(impl, dtype=torch.bfloat16, bf16_moments=False, cuda_graph=False, seed=0):
    optim = OptimConfig(
        lr=1e-3, warmup_steps=0, total_steps=10, implementation=impl, bf16_moments=bf16_moments
    )
    return LocalEngine(presets["tiny"], ParallelConfig(cuda_graph=cuda_graph), optim, "cpu", dtype, seed)


def _batch(seed, w=1.0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, presets["tiny"].vocab_size, (4, 17), generator=g)
    return {"tokens": data[:, :-1], "labels": data[:, 1:].clone(), "w": torch.tensor(w)}


class _Scaled(LMObjective):
    def __call__(self, h, head_weight, group, mb, model, denoms=None):
        loss, metrics = super().__call__(h, head_weight, group, mb, model, denoms)
        return loss * mb["w"], metrics


def test_engine_with_triton_adamw_trains_like_torch_adamw_and_skips_on_the_device():
    # fp32: the same metrics and weights as torch's AdamW, through the graph-ready step (the CPU runs it
    # without a capture), whose poisoned step the kernel skips on the device (no update, step counts kept)
    torch_engine, ours = _engine("torch", torch.float32), _engine("triton", torch.float32, cuda_graph=True)
    obj = _Scaled()
    for i, w in enumerate([1.0, 1.0, float("inf"), 1.0]):  # two ordinary warm-up steps, then the graph's path
        got = ours.train_step([_batch(i, w)], obj)
        if not math.isfinite(w):
            assert got["skipped_nonfinite"] == 1 and ours.step == 2
            continue
        want = torch_engine.train_step([_batch(i, w)], obj)
        assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-5)
        for (name, p), (_, q) in zip(ours.named_params, torch_engine.named_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert ours.graphed.static is not None  # the last steps ran the graph-ready path
    assert {float(s["step"]) for s in ours.optimizers[0].state.values()} == {3.0}


def test_engine_folds_bf16_masters_into_the_kernel_and_checkpoints_bf16_moments(tmp_path):
    # bf16 model, fp32 masters: the kernel reads the model's gradients and rounds the masters into the model
    # (no fp32 gradient is ever allocated); the loss follows torch's AdamW with MasterWeights' copies (the
    # CPU's interpreter rounds bf16 by truncation, so the bf16 forwards differ slightly). BF16 moments are
    # what a checkpoint saves and loads.
    torch_engine, ours = _engine("torch"), _engine("triton", bf16_moments=True)
    assert ours.optimizers_fuse_masters and not torch_engine.optimizers_fuse_masters
    for i in range(2):
        got, want = (e.train_step([_batch(i)], _Scaled()) for e in (ours, torch_engine))
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-2)
    for (name, m), (_, p) in zip(ours.master.named, ours.named_params):
        assert m.grad is None and _is_rounding_of(p, m), name
    ours.save(tmp_path / "ckpt")
    again = _engine("triton", bf16_moments=True, seed=5)
    again.load(tmp_path / "ckpt")
    for st, st2 in zip(ours.optimizers[0].state.values(), again.optimizers[0].state.values()):
        assert st2["exp_avg"].dtype == torch.bfloat16 and torch.equal(st2["exp_avg"], st["exp_avg"])
    for (name, m), (_, m2) in zip(ours.master.named, again.master.named):
        assert torch.equal(m, m2), name
    with pytest.raises(ValueError, match="bf16_moments=true needs implementation=triton"):
        OptimConfig(bf16_moments=True)


@pytest.mark.gpu
def test_adamw_kernel_at_a_v3_expert_shape_matches_the_reference_gpu():
    # one routed expert weight of DeepSeek-V3 ([2048, 7168]) with masters and BF16 moments, on the GPU
    n = 2048 * 7168
    p, grad, m, v = (t.cuda() for t in _tensors(n, torch.float32, torch.bfloat16, torch.bfloat16, seed=1))
    p_ref, m_ref, v_ref = p.clone(), m.clone(), v.clone()
    before = (p.clone(), m.clone(), v.clone())
    model, model_ref = (torch.empty(n, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    st, lr = torch.tensor(7.0, device="cuda"), torch.tensor(2e-4, device="cuda")
    adamw_step_(p, grad, m, v, st, lr, **HYPER, out=model)
    adamw_step_ref(p_ref, grad, m_ref, v_ref, st, lr, **HYPER, out=model_ref)
    # the update from |beta1 m| + |(1 - beta1) g|: where the two cancel, m's roundings are relative to them
    b1, b2, t = HYPER["beta1"], HYPER["beta2"], 7.0
    m_terms = b1 * before[1].double().abs() + (1 - b1) * grad.double().abs()
    terms = 2e-4 / (1 - b1**t) * m_terms / (v_ref.double().sqrt() / math.sqrt(1 - b2**t) + HYPER["eps"])
    _assert_within_rounding(p, p_ref, before[0], "p", terms=terms.float())
    for name, got, want, old in (("m", m, m_ref, before[1]), ("v", v, v_ref, before[2])):
        _assert_within_rounding(got, want, old, name)
    assert _is_rounding_of(model, p)


@pytest.mark.gpu
def test_one_launch_matches_the_per_tensor_kernel_and_the_norm_at_the_small_presets_shapes_gpu():
    # every parameter shape of the small preset (159 tensors, 1.7B values) on the GPU: the multi-tensor launch
    # (16-byte alignment hints, int64 offsets) equals the per-tensor kernel bit for bit, and the multi-tensor
    # sum of squares equals a float64 one
    with torch.device("meta"):
        shapes = [p.shape for p in Transformer(presets["small"].replace(n_mtp_modules=0)).parameters()]
    g = torch.Generator(device="cuda").manual_seed(0)
    grads = [(torch.randn(s, device="cuda", generator=g) * 1e-3).to(torch.bfloat16) for s in shapes]
    params = []
    for multi in (True, False):
        ps = [torch.zeros(s, device="cuda", dtype=torch.bfloat16).requires_grad_() for s in shapes]
        opt = TritonAdamW(ps, lr=1e-3, weight_decay=0.1, multi_tensor=multi)
        for _ in range(2):
            for p, gr in zip(ps, grads):
                p.grad = gr
            opt.step()
        params.append(ps)
    for a, b in zip(*params):
        assert torch.equal(a, b)
    want = sum(float(t.double().square().sum()) for t in grads)
    assert float(sum_of_squares(grads)) == pytest.approx(want, rel=1e-4)
