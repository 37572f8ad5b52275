"""The one-device training engine and the objectives: exact agreement with the model's own loss,
microbatch accumulation, the LR schedule, checkpoint round trips, forward-only passes, HF export."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from r1core.kernels.grpo_loss_terms import PolicyLossConfig
from r1core.model import Transformer, presets
from r1core.parallel import ParallelConfig
from r1core.train.engine import LocalEngine, OptimConfig, build_engine, lr_at
from r1core.train.objectives import GRPOObjective, LMObjective

ARGS = presets["tiny"]
OPTIM = OptimConfig(lr=1e-3, warmup_steps=0, total_steps=10)


def _batch(rows=4, seq=16, seed=1, docs=True) -> dict:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, ARGS.vocab_size, (rows, seq + 1), generator=g)
    mb = {"tokens": data[:, :-1], "labels": data[:, 1:].clone()}
    if docs:
        mb["doc_ids"] = (torch.arange(seq) >= seq // 2 + torch.arange(rows)[:, None]).long()
    return mb


def _engine(seed=0, **parallel) -> LocalEngine:
    return LocalEngine(ARGS, ParallelConfig(**parallel), OPTIM, "cpu", torch.float32, seed)


def test_engine_step_loss_equals_transformer_compute_loss():
    engine, mb = _engine(), _batch()
    model = Transformer(ARGS)
    model.load_state_dict(engine.model.state_dict())
    want = model.compute_loss(mb["tokens"], mb["labels"], mb["doc_ids"])
    got = engine.train_step([mb], LMObjective())
    assert got["loss"] == pytest.approx(want.loss.item(), rel=1e-6)
    assert got["ce"] == pytest.approx(want.ce.item(), rel=1e-6)
    assert got["mtp"] == pytest.approx(torch.stack(want.mtp).mean().item(), rel=1e-6)
    assert got["n_tokens"] == want.n_tokens


@pytest.mark.parametrize("split", ["config", "list"])
def test_microbatches_accumulate_to_the_whole_batch_gradient(split):
    mb = _batch()
    whole = _engine()
    want = whole.train_step([mb], LMObjective())
    if split == "config":
        parts, engine = [mb], _engine(microbatches=4)
    else:
        parts, engine = [{k: v[i : i + 1] for k, v in mb.items()} for i in range(4)], _engine()
    got = engine.train_step(parts, LMObjective())
    for key in ("loss", "ce", "mtp", "aux", "grad_norm"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    for (name, p), (_, q) in zip(whole.named_params, engine.named_params):
        torch.testing.assert_close(
            q.grad, p.grad, rtol=0, atol=1e-5 * p.grad.abs().max().item() + 1e-12, msg=name
        )


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=4, total_steps=14)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, cfg) == pytest.approx(0.1) and lr_at(100, cfg) == pytest.approx(0.1)
    linear = OptimConfig(lr=1.0, min_lr_ratio=0.0, total_steps=10, schedule="linear")
    assert lr_at(5, linear) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "bad",
    [dict(lr=0), dict(min_lr_ratio=2), dict(betas=(0.9, 1.0)), dict(schedule="step"), dict(grad_clip=-1)],
)
def test_optim_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        OptimConfig(**bad)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(agg="sum"), "agg='sum'"),
        (dict(eps_low=1.0), "eps_low=1.0"),
        (dict(dual_clip=0.5), "dual_clip=0.5"),
        (dict(temperature=0.0), "temperature=0.0"),
    ],
)
def test_grpo_objective_rejects_what_the_kernel_rejects_when_built(bad, message):
    scaling = {k: bad.pop(k) for k in ("temperature",) if k in bad}
    with pytest.raises(ValueError, match=message):
        GRPOObjective(PolicyLossConfig(**bad), **scaling)


def _grpo_mb(rows=4, seq=12, seed=3) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ARGS.vocab_size, (rows, seq), generator=g)
    lens = torch.tensor([3, 12, 0, 7])[:rows]
    return {
        "tokens": tokens,
        "targets": tokens.roll(-1, 1),
        "mask": (torch.arange(seq) < lens[:, None]).float(),
        "advantages": torch.randn(rows, generator=g),
        "old_logprobs": -6 + 0.2 * torch.randn(rows, seq, generator=g),
        "ref_logprobs": -6 + 0.2 * torch.randn(rows, seq, generator=g),
    }


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_grpo_objective_over_microbatches_equals_the_whole_batch_loss(agg):
    from r1core.kernels.grpo_loss import grpo_loss

    torch.manual_seed(0)
    model, mb = Transformer(ARGS), _grpo_mb()
    settings = PolicyLossConfig(beta=0.04, eps_low=0.2, eps_high=0.28, dual_clip=3.0, agg=agg)
    obj = GRPOObjective(settings, norm_len=12, impl="ref")
    h = torch.randn(4, 12, ARGS.dim, requires_grad=True)
    w = model.head.weight
    want, _ = grpo_loss(
        h,
        w,
        mb["targets"],
        mb["mask"],
        mb["advantages"],
        mb["old_logprobs"],
        mb["ref_logprobs"],
        beta=0.04,
        eps_high=0.28,
        dual_clip=3.0,
        agg=agg,
        norm_len=12,
        impl="ref",
    )
    parts = [{k: v[i : i + 2] for k, v in mb.items()} for i in (0, 2)]
    denoms = {k: obj.totals(parts[0])[k] + obj.totals(parts[1])[k] for k in obj.totals(mb)}
    got = sum(obj(h[i : i + 2], w, None, p, model, denoms=denoms)[0] for i, p in zip((0, 2), parts))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    (g_want,) = torch.autograd.grad(want, h)
    (g_got,) = torch.autograd.grad(got, h)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-8)


def test_save_and_load_resume_training_exactly(tmp_path):
    a, mb = _engine(), _batch()
    for _ in range(2):
        a.train_step([mb], LMObjective())
    a.save(tmp_path / "ckpt")
    memory = a.state_dict()
    after_a = a.train_step([mb], LMObjective())
    from_disk, from_memory = _engine(seed=5), _engine(seed=6)
    from_disk.load(tmp_path / "ckpt")
    from_memory.load_state_dict(memory)
    for b in (from_disk, from_memory):
        assert b.step == 2
        after_b = b.train_step([mb], LMObjective())
        assert after_b["loss"] == after_a["loss"] and after_b["lr"] == after_a["lr"]
        for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
            torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_saving_over_an_existing_checkpoint_replaces_it_whole(tmp_path):
    engine, mb = _engine(), _batch()
    engine.save(tmp_path / "ckpt")
    engine.train_step([mb], LMObjective())
    engine.save(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    fresh = _engine(seed=9)
    fresh.load(tmp_path / "ckpt")
    assert fresh.step == 1
    torch.testing.assert_close(fresh.model.head.weight, engine.model.head.weight, rtol=0, atol=0)


def test_step_moves_the_expert_bias_and_forward_only_leaves_routing_state_alone():
    engine, mb = _engine(), _batch()
    gate = engine.model.moe_layers()[0].gate
    bias0 = gate.e_score_correction_bias.clone()
    engine.train_step([mb], LMObjective())
    moved = gate.e_score_correction_bias - bias0
    assert moved.abs().max().item() == pytest.approx(ARGS.bias_update_speed)
    assert gate.expert_load.abs().sum() == 0
    bias1 = gate.e_score_correction_bias.clone()

    def logprobs(h, w, group, batch, model):
        return torch.log_softmax(F.linear(h, w).float(), -1).gather(-1, batch["labels"][..., None])[..., 0]

    (lp,) = engine.forward_only([mb], logprobs)
    assert gate.expert_load.abs().sum() == 0 and torch.equal(gate.e_score_correction_bias, bias1)
    assert engine.model.training
    with torch.no_grad():
        logits = engine.model.eval()(mb["tokens"], doc_ids=mb["doc_ids"])
    want = torch.log_softmax(logits, -1).gather(-1, mb["labels"][..., None])[..., 0]
    torch.testing.assert_close(lp, want, rtol=1e-5, atol=1e-5)


def test_export_hf_loads_back_with_identical_logits(tmp_path):
    from r1core.checkpoint.hf import from_pretrained

    engine, mb = _engine(), _batch()
    engine.train_step([mb], LMObjective())
    engine.export_hf(tmp_path / "hf")
    loaded = from_pretrained(tmp_path / "hf", dtype=torch.float32)
    torch.testing.assert_close(loaded(mb["tokens"]), engine.model(mb["tokens"]), rtol=0, atol=0)


def test_load_hf_starts_an_engine_from_exported_weights(tmp_path):
    source = _engine(seed=4)
    source.export_hf(tmp_path / "hf")
    for dtype in (torch.float32, torch.bfloat16):
        engine = LocalEngine(ARGS, ParallelConfig(), OPTIM, "cpu", dtype, 0)
        engine.load_hf(tmp_path / "hf")
        torch.testing.assert_close(
            engine.model.layers["1"].ffn.experts.w2.float(),
            source.model.layers["1"].ffn.experts.w2.to(dtype).float(),
            rtol=0,
            atol=0,
        )
        if engine.master is not None:  # the fp32 masters hold the checkpoint's exact values
            torch.testing.assert_close(
                dict(engine.master.named)["head.weight"], source.model.head.weight, rtol=0, atol=0
            )


def test_build_engine_without_torch_distributed_is_local():
    assert isinstance(build_engine(ARGS, ParallelConfig(), OPTIM, device="cpu"), LocalEngine)


def test_train_entry_runs_synthetic_pretraining_steps(tmp_path):
    from r1core.train.__main__ import main

    log = main(
        [
            "--steps",
            "3",
            "--seq-len",
            "16",
            "--batch",
            "2",
            "--out",
            str(tmp_path / "m.json"),
            "--save",
            str(tmp_path / "ckpt"),
        ]
    )
    assert len(log) == 3 and all(math.isfinite(m["loss"]) for m in log)
    assert (tmp_path / "m.json").exists() and (tmp_path / "ckpt" / ".metadata").exists()


@pytest.mark.gpu
def test_bf16_engine_with_triton_moe_on_gpu_tracks_the_fp32_run():
    args = ARGS.replace(moe_impl="triton")
    mb = {k: v.cuda() for k, v in _batch(rows=8, seq=64).items()}
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        engine = LocalEngine(args, ParallelConfig(), OPTIM, "cuda", dtype, 0)
        runs[dtype] = [engine.train_step([mb], LMObjective())["loss"] for _ in range(5)]
    assert runs[torch.bfloat16][-1] < runs[torch.bfloat16][0]
    for lo, hi in zip(runs[torch.bfloat16], runs[torch.float32]):
        assert lo == pytest.approx(hi, rel=2e-2)


def test_activation_checkpointing_gives_the_same_gradients_and_bias_updates():
    mb = _batch()
    plain, ac = _engine(), _engine(activation_checkpointing=True)
    want, got = plain.train_step([mb], LMObjective()), ac.train_step([mb], LMObjective())
    assert got["loss"] == want["loss"] and got["grad_norm"] == want["grad_norm"]
    for (name, p), (_, q) in zip(plain.named_params, ac.named_params):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    for x, y in zip(plain.model.moe_layers(), ac.model.moe_layers()):
        assert torch.equal(x.gate.e_score_correction_bias, y.gate.e_score_correction_bias)


def test_bf16_master_weights_keep_updates_below_bf16_resolution_and_checkpoint_fp32(tmp_path):
    mb, name = _batch(), "layers.0.attn.wo.weight"
    moved, engines = {}, {}
    for master in (True, False):
        optim = OptimConfig(lr=1e-5, warmup_steps=0, total_steps=10, weight_decay=0.0, master_weights=master)
        engine = engines[master] = LocalEngine(ARGS, ParallelConfig(), optim, "cpu", torch.bfloat16, 0)
        w0 = engine.model.get_parameter(name).detach().float().clone()
        for _ in range(3):
            engine.train_step([mb], LMObjective())
        w = dict(engine.master.named)[name] if master else engine.model.get_parameter(name)
        moved[master] = ((w.detach().float() - w0).abs() > 1e-5).float().mean().item()
    # three AdamW steps of ~1e-5 are below half an ulp of most bf16 weights (~0.02): pure bf16 drops them
    assert moved[True] > 0.9 and moved[False] < 0.3
    engine = engines[True]
    engine.save(tmp_path / "ckpt")
    fp32 = _engine(seed=3)
    fp32.load(tmp_path / "ckpt")
    torch.testing.assert_close(
        fp32.model.get_parameter(name), dict(engine.master.named)[name].detach(), rtol=0, atol=0
    )


class _PoisonOnce(LMObjective):
    """The LM loss, made inf on the calls listed (a bf16 overflow, a kernel bug)."""

    def __init__(self, bad_calls):
        super().__init__()
        self.bad_calls, self.calls = set(bad_calls), 0

    def __call__(self, h, *args, **kwargs):
        self.calls += 1
        if self.calls in self.bad_calls:
            h = h * float("inf")
        return super().__call__(h, *args, **kwargs)


def test_nonfinite_gradient_skips_the_step_and_too_many_in_a_row_stop_training(caplog):
    a, b, mb = _engine(), _engine(), _batch()
    a.train_step([mb], LMObjective())
    b.train_step([mb], LMObjective())
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    with caplog.at_level("WARNING", logger="r1core.train.engine"):
        m = b.train_step([mb], _PoisonOnce({1}))
    assert m["skipped_nonfinite"] == 1 and not math.isfinite(m["grad_norm"]) and b.step == 1
    assert "skipped optimizer step 2" in caplog.text and "non-finite gradients" in caplog.text
    for k, v in b.model.state_dict().items():  # nothing moved, the expert-score bias included
        assert torch.equal(v, before[k]), k
    # the skipped step left no trace: the next finite step equals a clean engine's
    want, got = a.train_step([mb], LMObjective()), b.train_step([mb], LMObjective())
    assert got["loss"] == want["loss"] and got["lr"] == want["lr"] and "skipped_nonfinite" not in got
    for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    poison = _PoisonOnce(range(1, 100))
    for _ in range(OPTIM.max_nonfinite_steps):
        b.train_step([mb], poison)
    with pytest.raises(
        FloatingPointError, match=r"4 consecutive optimizer steps \(after step 2\).*non-finite"
    ):
        b.train_step([mb], poison)


def test_backward_writes_gradients_fresh_with_zeros_only_where_it_wrote_none():
    # Gradients are None when backward starts (nothing is zeroed, then added to); a parameter backward
    # did not reach (the MTP block, on one-token rows) gets a zero gradient and steps as before. Weights
    # and gradients equal, bit for bit, those of the former step that zeroed every gradient buffer first.
    class Zeroing(LocalEngine):
        def _zero_grad(self):
            for _, p in self.named_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            torch._foreach_zero_([p.grad for _, p in self.named_params])

    fresh, zeroing = _engine(), Zeroing(ARGS, ParallelConfig(), OPTIM, "cpu", torch.float32, 0)
    seen = []
    fresh.model.layers["0"].register_forward_pre_hook(
        lambda *_: seen.append(all(p.grad is None for _, p in fresh.named_params))
    )
    mtp = [p for n, p in fresh.named_params if n.startswith("mtp.")]
    for batch in (_batch(seed=1), _batch(seq=1, docs=False), _batch(seed=3)):
        fresh.train_step([batch], LMObjective())
        zeroing.train_step([batch], LMObjective())
        if batch["tokens"].shape[1] == 1:
            assert mtp and all(p.grad is not None and not p.grad.any() for p in mtp)
        for (name, p), (_, q) in zip(fresh.named_params, zeroing.named_params):
            assert torch.equal(p, q) and torch.equal(p.grad, q.grad), name
    assert len(seen) == 3 and all(seen)


def test_fused_adamw_clips_inside_its_step_as_clip_then_step_does(monkeypatch):
    # A fused AdamW divides the gradients by the inverse clip factor inside its own kernel (grad_scale), so
    # clip_ never runs; weights and the gradients left behind match clip-then-step (torch's foreach AdamW
    # after clip_grads_with_norm_) to fp32 rounding, and clipping did bind (an unclipped run ends elsewhere).
    import r1core.parallel.optim as optim_mod
    from r1core.parallel.optim import adamw

    class Fused(LocalEngine):
        def _build_optimizers(self):
            params = [p for _, p in self.optimized_params]
            return [torch.optim.AdamW(params, lr=OPTIM.lr, betas=OPTIM.betas, eps=OPTIM.eps, fused=True)]

    class Plain(LocalEngine):
        def _build_optimizers(self):
            params = [p for _, p in self.optimized_params]
            return [torch.optim.AdamW(params, lr=OPTIM.lr, betas=OPTIM.betas, eps=OPTIM.eps, foreach=True)]

    clipped = OptimConfig(lr=1e-3, warmup_steps=0, total_steps=10, grad_clip=0.05, weight_decay=0.0)
    unclipped = OptimConfig(lr=1e-3, warmup_steps=0, total_steps=10, grad_clip=0.0, weight_decay=0.0)
    assert adamw([("w", torch.zeros(2, 2))], clipped).defaults["fused"] is None  # the CPU default: not fused
    fused, plain = (E(ARGS, ParallelConfig(), clipped, "cpu", torch.float32, 0) for E in (Fused, Plain))
    free = Fused(ARGS, ParallelConfig(), unclipped, "cpu", torch.float32, 0)
    calls = []
    real_clip = optim_mod.clip_
    monkeypatch.setattr(optim_mod, "clip_", lambda *a: calls.append(1) or real_clip(*a))
    for seed in (1, 2, 3):
        got = fused.train_step([_batch(seed=seed)], LMObjective())
        assert not calls, "the fused optimizer's step should clip, not clip_"
        want = plain.train_step([_batch(seed=seed)], LMObjective())
        assert calls == [1]
        calls.clear()
        free.train_step([_batch(seed=seed)], LMObjective())
        assert got["grad_norm"] > 10 * clipped.grad_clip  # every step is clipped
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
        norm = torch.stack([p.grad.norm() for _, p in fused.named_params]).norm()
        assert norm.item() == pytest.approx(clipped.grad_clip, rel=1e-4)  # the clipped gradients stay behind
        for (name, p), (_, q) in zip(fused.named_params, plain.named_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-8, msg=name)
    moved = max((p - q).abs().max().item() for (_, p), (_, q) in zip(fused.named_params, free.named_params))
    assert moved > 1e-4


class _Scaled(LMObjective):
    """The LM loss times the batch's `w`, a device scalar: w = inf poisons a step from the data, which a
    captured graph replays (a host-side decision like _PoisonOnce's would be baked into the graph)."""

    def __call__(self, h, head_weight, group, mb, model, denoms=None):
        loss, metrics = super().__call__(h, head_weight, group, mb, model, denoms)
        return loss * mb["w"], metrics


class _FusedEngine(LocalEngine):
    def _build_optimizers(self):
        from r1core.parallel.optim import adamw

        return [adamw(self.optimized_params, self.optim_cfg, graphable=True)]  # fused, float lr, no graph


def _adam_steps(engine) -> set[float]:
    return {float(st["step"]) for st in engine.optimizers[0].state.values()}


def test_graph_ready_step_equals_the_fused_step_and_skips_a_nonfinite_step_on_the_device():
    # parallel.cuda_graph's step without the capture (the CPU has no graphs): static inputs, a device
    # learning rate, the non-finite skip decided on the device (found_inf) instead of on the host. Its
    # metrics and weights equal the ordinary step's with the same fused AdamW; a poisoned step moves no
    # weight, AdamW step count or expert bias and is counted; a new batch shape warms up again.
    from r1core.parallel.config import check_layout
    from r1core.train.cuda_graph import GraphedTrainStep

    with pytest.raises(ValueError, match="cuda_graph=true runs on one device"):
        check_layout(ARGS, ParallelConfig(cuda_graph=True), 2)
    graphed = LocalEngine(ARGS, ParallelConfig(cuda_graph=True), OPTIM, "cpu", torch.float32, 0)
    fused = _FusedEngine(ARGS, ParallelConfig(), OPTIM, "cpu", torch.float32, 0)
    step = graphed.graphed
    assert isinstance(step, GraphedTrainStep) and not step.capture and step.warmup == 2
    gate = graphed.model.moe_layers()[0].gate
    obj = _Scaled()
    for i, w in enumerate([1.0, 1.0, 1.0, float("inf"), 1.0, 1.0]):
        mb = {**_batch(seed=i), "w": torch.tensor(w)}
        before = {k: v.clone() for k, v in graphed.model.state_dict().items()}
        got = graphed.train_step([mb], obj)
        assert (step.static is not None) == (i >= 2)  # two ordinary warm-up steps, then the graph's path
        if not math.isfinite(w):
            assert got["skipped_nonfinite"] == 1 and not math.isfinite(got["grad_norm"])
            assert graphed.step == 3 and graphed.nonfinite_streak == 1 and _adam_steps(graphed) == {3.0}
            for k, v in graphed.model.state_dict().items():  # the expert-score bias included
                assert torch.equal(v, before[k]), k
            assert gate.expert_load.abs().sum() == 0
            continue
        want = fused.train_step([mb], obj)
        assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-6)
        assert got["step"] == want["step"] and graphed.nonfinite_streak == 0
        for (name, p), (_, q) in zip(graphed.named_params, fused.named_params):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(
            gate.e_score_correction_bias, fused.model.moe_layers()[0].gate.e_score_correction_bias
        )
    assert _adam_steps(graphed) == {5.0} and graphed.step == 5
    # another batch shape: the static inputs are dropped and two ordinary steps warm up again
    graphed.train_step([{**_batch(seq=8), "w": torch.tensor(1.0)}], obj)
    assert step.static is None and step.warm == 1 and not step.gave_up
    # shapes that change every step never reach a capture: after GIVE_UP_AFTER changes, ordinary steps
    for seq in (9, 10, 11):
        graphed.train_step([{**_batch(seq=seq), "w": torch.tensor(1.0)}], obj)
    assert step.gave_up and graphed.step == 9
    graphed.train_step([{**_batch(seq=12), "w": torch.tensor(1.0)}], obj)
    assert step.static is None and graphed.step == 10


@pytest.mark.gpu
@pytest.mark.parametrize("adamw", ["torch", "triton"])
def test_cuda_graph_step_replays_the_graph_ready_step_gpu(adamw):
    # The captured step (one replay per optimizer step) against the same step run eagerly without capture
    # and against the ordinary step (bf16, fp32 master weights, Triton MoE, a cosine learning rate): the
    # replays read each new batch and learning rate (the fp32 masters agree to far less than one step's
    # update of 1e-3, left only to the kernels' run-to-run rounding); a step poisoned through the data is
    # skipped inside the graph; a new batch shape captures again.
    from r1core.train.cuda_graph import GraphedTrainStep

    # adamw=triton: r1core's AdamW kernel inside the graph, folding in the master copies
    args = ARGS.replace(moe_impl="triton")
    optim = OptimConfig(lr=1e-3, warmup_steps=0, total_steps=10, implementation=adamw)
    graph, ready, plain = (
        LocalEngine(args, ParallelConfig(cuda_graph=g), optim, "cuda", torch.bfloat16, 0)
        for g in (True, True, False)
    )
    ready.graphed = GraphedTrainStep(ready, capture=False)
    obj = _Scaled()
    for i, w in enumerate([1.0, 1.0, 1.0, 1.0, float("inf"), 1.0, 1.0]):
        mb = {**_batch(rows=8, seq=64, seed=i), "w": torch.tensor(w)}
        got, want, base = (e.train_step([mb], obj) for e in (graph, ready, plain))
        assert got.get("skipped_nonfinite") == want.get("skipped_nonfinite") == base.get("skipped_nonfinite")
        assert got["step"] == want["step"] == base["step"] and got["lr"] == want["lr"] == base["lr"]
        if math.isfinite(w):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
            assert got["loss"] == pytest.approx(base["loss"], rel=1e-3)
        for e in (graph, ready, plain):
            for (name, p), (_, q) in zip(e.master.named, ready.master.named):
                torch.testing.assert_close(p, q, rtol=0, atol=2e-5, msg=name)
    assert graph.graphed.graph is not None and graph.graphed.captures == 1 and graph.step == 6
    for i in range(3):
        graph.train_step([{**_batch(rows=4, seq=32, seed=10 + i), "w": torch.tensor(1.0)}], obj)
    assert graph.graphed.captures == 2 and graph.step == 9


def test_a_checkpoint_with_separate_gate_and_up_expert_weights_loads_into_w13(tmp_path, caplog):
    # checkpoints written before the routed experts' gate and up weights were stacked hold w1 / w3 (and
    # their Adam moments): they load into w13's halves, and training goes on exactly as from the original
    from r1core.checkpoint import dist as dcp_ckpt
    from r1core.testing import with_separate_gate_and_up

    a, mb = _engine(), _batch()
    a.train_step([mb], LMObjective())
    legacy = with_separate_gate_and_up(a.state_dict())
    assert any(k.startswith("optim.") and ".experts.w3." in k for k in legacy)
    dcp_ckpt.save(legacy, tmp_path / "old")
    b = _engine(seed=5)
    with caplog.at_level("INFO", logger="r1core.train.engine"):
        b.load(tmp_path / "old")
    assert "separate w1 / w3" in caplog.text
    assert b.step == 1
    after_a, after_b = a.train_step([mb], LMObjective()), b.train_step([mb], LMObjective())
    assert after_b["loss"] == after_a["loss"]
    for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
