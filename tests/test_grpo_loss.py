"""Fused GRPO loss / linear cross-entropy / token log-probs against the materialized-logits references.

CPU: every Triton kernel runs under TRITON_INTERPRET=1 at small, odd shapes (V = 97 spans several
vocab tiles with a ragged last one), fp32, with CHUNK_BYTES shrunk so the chunked path runs several
chunks. GPU (`gpu` marker): bf16 at B2xT512 with the Qwen-size head and the DeepSeek-V3 head.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from r1core.kernels import _grpo_loss_triton as tk
from r1core.kernels import grpo_loss as G
from r1core.kernels.grpo_loss import (
    grpo_loss,
    grpo_loss_ref,
    linear_cross_entropy,
    linear_cross_entropy_ref,
    token_logprobs,
)
from r1core.kernels.grpo_loss_terms import PolicyLossConfig
from r1core.model.transformer import cross_entropy_sum
from r1core.testing import assert_close_to_ref, run_distributed

FUSED = ["chunked", "chunked_fp32", "triton"]
B, T, H, V = 3, 5, 40, 97
STAT_KEYS = ("clip_frac_low", "clip_frac_high", "kl", "ratio")


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    # 4 rows of fp32 logits per chunk: B*T = 15 tokens run as 4 chunks, the last one ragged
    monkeypatch.setattr(G, "CHUNK_BYTES", 4 * V * 4)


def make_inputs(b=B, t=T, h=H, v=V, dtype=torch.float32, device="cpu", hidden_scale=1.0, seed=0):
    """fp32 inputs made on `device`; logits ~ N(0, 16) (times hidden_scale)."""
    g = torch.Generator(device=device).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device)  # noqa: E731
    hidden = randn(b, t, h) * hidden_scale / math.sqrt(h) * 4
    weight = randn(v, h)
    targets = torch.randint(0, v, (b, t), generator=g, device=device)
    mask = torch.rand(b, t, generator=g, device=device) > 0.25
    mask[-1] = False  # a row with no response token
    # old / ref log-probs near the current ones so ratios straddle both clip edges
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets[..., None])[..., 0]
    return dict(
        hidden=hidden.to(dtype),
        weight=weight.to(dtype),
        targets=targets,
        mask=mask,
        advantages=randn(b),
        old_logprobs=logp + 0.3 * randn(b, t),
        ref_logprobs=logp + 0.3 * randn(b, t),
        is_weights=(torch.rand(b, t, generator=g, device=device) * 2).clamp(min=0.4),
    )


def run(fn, inputs, grad_scale=1.0, **kw):
    hidden = inputs["hidden"].detach().clone().requires_grad_()
    weight = inputs["weight"].detach().clone().requires_grad_()
    loss, stats = fn(
        hidden, weight, **{k: v for k, v in inputs.items() if k not in ("hidden", "weight")}, **kw
    )
    (loss * grad_scale).backward()
    return loss.detach(), stats, hidden.grad, weight.grad


def check_against_ref(impl, inputs, floor=1e-6, grad_scale=1.0, **kw):
    """The tolerance rule one level up: the fp32 kernel against an fp64 reference, with the fp32
    reference's own error as the budget (x2) plus a floor relative to the largest magnitude."""
    out = run(grpo_loss, inputs, grad_scale, impl=impl, **kw)
    lowp = run(grpo_loss_ref, inputs, grad_scale, **kw)
    oracle = run(
        grpo_loss_ref,
        dict(inputs, hidden=inputs["hidden"].double(), weight=inputs["weight"].double()),
        grad_scale,
        **kw,
    )
    for name, i, key in [("loss", 0, None), ("grad hidden", 2, None), ("grad weight", 3, None)] + [
        (key, 1, key) for key in ("logprobs", "entropy") + STAT_KEYS
    ]:
        x, ref, ref_lowp = (r[i] if key is None else r[i][key] for r in (out, oracle, lowp))
        assert_close_to_ref(x, ref, ref_lowp, floor=floor * max(1.0, ref.abs().max().item()), name=name)
    return out


@pytest.mark.parametrize("agg", G.AGGS)
@pytest.mark.parametrize("impl", FUSED)
def test_grpo_loss_matches_reference_with_kl_old_logprobs_and_is_weights(impl, agg):
    inputs = make_inputs()
    _, stats, gh, _ = check_against_ref(
        impl,
        inputs,
        grad_scale=3.0,
        beta=0.1,
        eps_high=0.28,
        agg=agg,
        norm_len=7 if agg == "seq_mean_token_sum_norm" else None,
    )
    assert gh[-1].abs().max() == 0, "the all-masked row must get no gradient"
    assert 0 < stats["clip_frac_low"] + stats["clip_frac_high"] < 1, "inputs should clip some tokens"


@pytest.mark.parametrize("impl", FUSED)
def test_grpo_loss_on_policy_with_temperature_and_dual_clip_matches_reference(impl):
    inputs = make_inputs(seed=1)
    inputs.update(old_logprobs=None, ref_logprobs=None, is_weights=None, advantages=torch.randn(B, T))
    _, stats, _, _ = check_against_ref(impl, inputs, temperature=0.7, dual_clip=3.0, agg="token_mean")
    assert stats["ratio"].item() == 1.0 and stats["kl"].item() == 0.0


@pytest.mark.parametrize("impl", FUSED)
def test_grpo_loss_extreme_logits_stay_finite_and_match(impl):
    inputs = make_inputs(hidden_scale=1e3, seed=2)  # logits in the thousands
    with torch.no_grad():
        _, s = grpo_loss_ref(
            inputs["hidden"], inputs["weight"], inputs["targets"], inputs["mask"], inputs["advantages"]
        )
    inputs["old_logprobs"] = s["logprobs"] + 0.1 * torch.randn(B, T)
    inputs["ref_logprobs"] = s["logprobs"] + 0.1 * torch.randn(B, T)
    assert s["logprobs"].abs().max() > 100
    # logits near 1.5e4 carry fp32 rounding of ~1e-3 before any kernel runs: floor = 1 ulp of the largest
    zmax = (inputs["hidden"] @ inputs["weight"].T).abs().max().item()
    loss, stats, gh, gw = check_against_ref(impl, inputs, floor=2.0**-23 * zmax, beta=0.05)
    for x in (loss, stats["entropy"], stats["logprobs"], gh, gw):
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("impl", ["chunked", "triton", "ref"])
def test_grpo_loss_ignores_garbage_old_ref_and_is_weights_outside_the_mask(impl):
    inputs = make_inputs(seed=8)
    clean = run(grpo_loss, inputs, impl=impl, beta=0.1)
    off = ~inputs["mask"]
    dirty = dict(
        inputs,
        old_logprobs=inputs["old_logprobs"].masked_fill(off, 1e4),
        ref_logprobs=inputs["ref_logprobs"].masked_fill(off, 1e4),
        is_weights=inputs["is_weights"].masked_fill(off, float("nan")),
    )
    out = run(grpo_loss, dirty, impl=impl, beta=0.1)
    for name, i in (("loss", 0), ("grad hidden", 2), ("grad weight", 3)):
        assert torch.equal(out[i], clean[i]), name
    for key in STAT_KEYS:
        assert torch.equal(out[1][key], clean[1][key]), key


def two_token_case(ratios, advs, dual_clip=None):
    """1 row, 2 tokens, V = H = 3, W = I, h = 0: p = 1/3 everywhere; old chosen for the given ratios."""
    hidden = torch.zeros(1, 2, 3)
    weight = torch.eye(3)
    targets = torch.tensor([[0, 2]])
    old = math.log(1 / 3) - torch.log(torch.tensor([ratios]))
    kw = dict(
        hidden=hidden,
        weight=weight,
        targets=targets,
        mask=torch.ones(1, 2, dtype=torch.bool),
        advantages=torch.tensor([advs]),
        old_logprobs=old,
        ref_logprobs=torch.full((1, 2), math.log(1 / 3)),
    )
    return kw, dict(eps_low=0.2, eps_high=0.2, agg="token_mean", beta=0.5, dual_clip=dual_clip)


@pytest.mark.parametrize("impl", FUSED + ["ref"])
def test_grpo_loss_clips_ratio_above_eps_high_and_below_eps_low_exactly(impl):
    # token 0: rho 1.5 > 1.2 with A = +1 -> objective 1.2 A; token 1: rho 0.5 < 0.8 with A = -1 -> 0.8 A
    inputs, kw = two_token_case([1.5, 0.5], [1.0, -1.0])
    loss, stats, gh, gw = run(grpo_loss, inputs, impl=impl, **kw)
    assert loss.item() == pytest.approx(-(1.2 * 1 + 0.8 * -1) / 2, abs=1e-6)  # KL term is 0: ref == logp
    assert gh.abs().max().item() < 1e-7 and gw.abs().max().item() < 1e-7, "clipped tokens pass no gradient"
    assert stats["clip_frac_high"].item() == 0.5 and stats["clip_frac_low"].item() == 0.5
    assert stats["ratio"].item() == pytest.approx(1.0, abs=1e-6) and abs(stats["kl"].item()) < 1e-6


@pytest.mark.parametrize("impl", FUSED + ["ref"])
def test_grpo_loss_unclipped_token_gradient_is_exact(impl):
    # token 0: rho 1.1 inside the clip range, A = +1: dloss/dlogp = -rho A / 2 = -0.55, and
    # dlogp/dz = onehot - 1/3, W = I, so grad h_0 = -0.55 * ([1, 0, 0] - 1/3); token 1 is clipped.
    inputs, kw = two_token_case([1.1, 0.5], [1.0, -1.0])
    loss, _, gh, _ = run(grpo_loss, inputs, impl=impl, **kw)
    assert loss.item() == pytest.approx(-(1.1 - 0.8) / 2, abs=1e-6)
    expected = -0.55 * (torch.tensor([1.0, 0, 0]) - 1 / 3)
    torch.testing.assert_close(gh[0, 0], expected, atol=1e-6, rtol=0)
    assert gh[0, 1].abs().max().item() < 1e-7


@pytest.mark.parametrize("impl", FUSED + ["ref"])
def test_grpo_loss_dual_clip_bounds_negative_advantage_objective(impl):
    # rho 4 with A = -1 and c = 3: min(-4, -1.2) = -4 < -3 -> objective -3 (loss 1.5 per token / 2), no
    # gradient
    inputs, kw = two_token_case([4.0, 1.0], [-1.0, 0.0], dual_clip=3.0)
    loss, _, gh, _ = run(grpo_loss, inputs, impl=impl, **kw)
    assert loss.item() == pytest.approx(3.0 / 2, abs=1e-6)
    assert gh.abs().max().item() < 1e-7


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("impl", FUSED)
def test_linear_cross_entropy_matches_f_cross_entropy_with_ignore_index(impl, reduction):
    inputs = make_inputs(seed=3)
    hidden, weight = inputs["hidden"].reshape(-1, H), inputs["weight"]
    targets = inputs["targets"].reshape(-1).clone()
    targets[::4] = -100
    outs = []
    for fn in (
        lambda h, w: linear_cross_entropy(h, w, targets, reduction=reduction, impl=impl),
        lambda h, w: F.cross_entropy((h @ w.T).float(), targets, ignore_index=-100, reduction=reduction),
        lambda h, w: linear_cross_entropy_ref(h, w, targets, reduction=reduction),
    ):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        outs.append((loss.detach(), h.grad, w.grad))
    for out in (outs[0], outs[2]):
        for name, x, ref in zip(("loss", "grad hidden", "grad weight"), out, outs[1]):
            assert_close_to_ref(x, ref, floor=1e-5, name=name)


@pytest.mark.parametrize("loss_name", ["grpo_loss", "linear_cross_entropy"])
@pytest.mark.parametrize("impl", FUSED)
def test_fused_loss_backward_split_into_input_then_weight_pass_matches_one_backward(impl, loss_name):
    # Zero-bubble pipeline schedules (DualPipeV) run the last stage's backward as an input pass and, later,
    # a weight pass through the same loss node (torch's stage_backward_input / stage_backward_weight); a
    # loss whose backward could run once raised at the first weight action ("3W0") on two GPUs.
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    inputs = make_inputs(seed=13)
    proj = torch.nn.Linear(H, H, bias=False)
    head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(inputs["weight"])
    params = list(proj.parameters()) + list(head.parameters())
    x = inputs["hidden"].clone().requires_grad_()
    rest = {k: v for k, v in inputs.items() if k not in ("hidden", "weight")}

    def loss_of_x():  # scaled: the backward's grad_output is not 1 (the usual path scales the buffers)
        h = proj(x)
        if loss_name == "grpo_loss":
            return 3.0 * grpo_loss(h, head.weight, **rest, beta=0.1, impl=impl)[0]
        return 3.0 * linear_cross_entropy(
            h.reshape(-1, H), head.weight, rest["targets"].reshape(-1), impl=impl
        )

    loss_of_x().backward()
    want = [x.grad] + [p.grad for p in params]
    x.grad = None
    for p in params:
        p.grad = None
    dx, groups = stage_backward_input([loss_of_x()], None, [x], iter(params))
    assert all(p.grad is None for p in params)  # the input pass leaves the weights alone
    stage_backward_weight(iter(params), groups)
    for name, got, ref in zip(
        ("grad x", "grad proj", "grad head"), [x.grad] + [p.grad for p in params], want
    ):
        assert_close_to_ref(got, ref, floor=1e-6, name=name)


def test_linear_cross_entropy_is_the_models_ce_sum_and_all_ignored_is_zero():
    inputs = make_inputs(seed=4)
    hidden, weight = inputs["hidden"].reshape(-1, H), inputs["weight"]
    targets = inputs["targets"].reshape(-1)
    assert_close_to_ref(
        linear_cross_entropy(hidden, weight, targets),
        cross_entropy_sum(hidden, weight, targets),
        floor=1e-4,
        name="ce_sum",
    )
    ignored = torch.full_like(targets, -100)
    for reduction in ("sum", "mean"):
        assert linear_cross_entropy(hidden, weight, ignored, reduction=reduction).item() == 0.0


@pytest.mark.parametrize("impl", FUSED + ["ref"])
def test_token_logprobs_match_reference_without_a_graph(impl):
    inputs = make_inputs(seed=5)
    hidden = inputs["hidden"].clone().requires_grad_()
    logp, ent = token_logprobs(hidden, inputs["weight"], inputs["targets"], temperature=1.3, impl=impl)
    with torch.no_grad():
        _, s = grpo_loss_ref(
            inputs["hidden"],
            inputs["weight"],
            inputs["targets"],
            inputs["mask"],
            inputs["advantages"],
            temperature=1.3,
        )
    assert logp.grad_fn is None and ent.grad_fn is None and logp.shape == (B, T)
    assert_close_to_ref(logp, s["logprobs"], floor=1e-5, name="logprobs")
    assert_close_to_ref(ent, s["entropy"], floor=1e-5, name="entropy")


def test_frozen_head_or_frozen_hidden_gets_only_the_other_gradient():
    inputs = make_inputs(seed=6)
    _, _, gh_ref, gw_ref = run(grpo_loss_ref, inputs)
    rest = {k: v for k, v in inputs.items() if k not in ("hidden", "weight")}
    h = inputs["hidden"].clone().requires_grad_()
    grpo_loss(h, inputs["weight"], **rest)[0].backward()
    assert_close_to_ref(h.grad, gh_ref, floor=1e-5, name="grad hidden (frozen head)")
    w = inputs["weight"].clone().requires_grad_()
    grpo_loss(inputs["hidden"], w, **rest)[0].backward()
    assert_close_to_ref(w.grad, gw_ref, floor=1e-5, name="grad weight (frozen hidden)")


def test_row_grad_written_over_fp32_logits_equals_a_separate_buffer():
    # chunked_fp32 with bf16 inputs writes the bf16 gradient into the first half of each fp32 row
    x = torch.randn(6, V) * 3
    tgt, lse = torch.randint(0, V, (6,)), torch.logsumexp(x * 0.5, -1)
    coef = torch.randn(6)
    separate = torch.empty(6, V, dtype=torch.bfloat16)
    tk.row_grad(x, separate, tgt, lse, coef, 0, 0.5)
    aliased = x.clone()
    g = aliased.view(torch.bfloat16)[:, :V]
    tk.row_grad(aliased, g, tgt, lse, coef, 0, 0.5)
    assert torch.equal(g, separate)


def test_bad_inputs_raise_errors_naming_the_culprit():
    inputs = make_inputs()
    rest = {k: v for k, v in inputs.items() if k not in ("hidden", "weight")}
    h, w = inputs["hidden"], inputs["weight"]
    with pytest.raises(ValueError, match="agg="):
        grpo_loss(h, w, **rest, agg="seq_sum")
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(h, w, **{**rest, "advantages": torch.zeros(B + 1)})
    with pytest.raises(ValueError, match="dtype"):
        grpo_loss(h.half(), w.half(), **rest)
    with pytest.raises(ValueError, match="weight must be"):
        grpo_loss(h, w[:, :-1], **rest)
    with pytest.raises(ValueError, match="targets must lie"):
        grpo_loss(h, w, **{**rest, "targets": rest["targets"] + V})
    with pytest.raises(ValueError, match="dual_clip"):
        grpo_loss(h, w, **rest, dual_clip=0.5)
    with pytest.raises(ValueError, match="impl="):
        grpo_loss(h, w, **rest, impl="cuda")
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h.reshape(-1, H), w, rest["targets"].reshape(-1), reduction="none")


def test_settings_as_a_config_or_as_keywords_give_the_same_loss_and_not_both():
    inputs = make_inputs()
    args = [inputs[k] for k in ("hidden", "weight", "targets", "mask", "advantages")]
    cfg = PolicyLossConfig(beta=0.1, eps_high=0.3, agg="seq_mean_token_mean")
    by_config = grpo_loss(*args, loss=cfg)[0]
    assert by_config.item() == grpo_loss(*args, beta=0.1, eps_high=0.3, agg="seq_mean_token_mean")[0].item()
    assert (
        by_config.item() != grpo_loss(*args)[0].item()
    )  # the defaults differ (token_mean): the config was used
    with pytest.raises(ValueError, match="not both"):
        grpo_loss(*args, loss=cfg, beta=0.2)


def test_second_backward_through_chunked_loss_adds_the_same_gradient_again():
    inputs = make_inputs()
    h = inputs["hidden"].clone().requires_grad_()
    loss, _ = grpo_loss(
        h, inputs["weight"], **{k: v for k, v in inputs.items() if k not in ("hidden", "weight")}
    )
    (2 * loss).backward(retain_graph=True)
    once = h.grad.clone()
    (2 * loss).backward()  # the saved buffers were scaled out of place: the first backward left them intact
    torch.testing.assert_close(h.grad, 2 * once, rtol=0, atol=0)


# ----------------------------------------------------------------------------- vocab parallel (gloo)


def _vocab_parallel_worker(rank, world, inputs, impls):
    import torch.distributed as dist

    group = dist.group.WORLD
    G.CHUNK_BYTES = 4 * V * 4
    shard = inputs["weight"].shape[0] // world
    local = dict(inputs, weight=inputs["weight"][rank * shard : (rank + 1) * shard])
    out = {}
    for impl in impls:
        loss, stats, gh, gw = run(grpo_loss, local, beta=0.1, vocab_group=group, impl=impl)
        h = inputs["hidden"].reshape(-1, H).clone().requires_grad_()
        w = local["weight"].clone().requires_grad_()
        ce = linear_cross_entropy(
            h, w, inputs["targets"].reshape(-1), reduction="mean", vocab_group=group, impl=impl
        )
        ce.backward()
        out[impl] = [
            x.detach().numpy()
            for x in (loss, stats["logprobs"], stats["entropy"], gh, gw, ce, h.grad, w.grad)
        ]
    return out  # numpy: torch tensors would cross the queue as shared memory that dies with the worker


def test_vocab_parallel_matches_single_process_for_grpo_and_cross_entropy():
    inputs = make_inputs(v=2 * 49, seed=7)  # 49 vocab rows per rank: odd, several tiles
    impls = FUSED + ["ref"]
    results = run_distributed(_vocab_parallel_worker, 2, inputs, impls)
    loss_r, stats_r, gh_r, gw_r = run(grpo_loss_ref, inputs, beta=0.1)
    h = inputs["hidden"].reshape(-1, H).clone().requires_grad_()
    w = inputs["weight"].clone().requires_grad_()
    ce_r = linear_cross_entropy_ref(h, w, inputs["targets"].reshape(-1), reduction="mean")
    ce_r.backward()
    for rank, res in enumerate(results):
        rows = slice(rank * 49, (rank + 1) * 49)
        for impl in impls:
            loss, logp, ent, gh, gw, ce, ce_gh, ce_gw = map(torch.from_numpy, res[impl])
            refs = (
                loss_r,
                stats_r["logprobs"],
                stats_r["entropy"],
                gh_r,
                gw_r[rows],
                ce_r,
                h.grad,
                w.grad[rows],
            )
            names = (
                "loss",
                "logprobs",
                "entropy",
                "grad hidden",
                "grad weight shard",
                "ce",
                "ce grad hidden",
                "ce grad weight shard",
            )
            for name, x, ref in zip(names, (loss, logp, ent, gh, gw, ce, ce_gh, ce_gw), refs):
                assert_close_to_ref(x, ref, floor=2e-5, name=f"rank {rank} {impl} {name}")


# ----------------------------------------------------------------------------- GPU (bf16, real heads)

GPU_SHAPES = {"qwen_head": (2, 512, 4096, 151936), "deepseek_v3_head": (2, 512, 7168, 129280)}


def _away_from_clip_edges(inputs: dict, seed: int = 5) -> dict:
    """Old log-probs whose ratios sit >= 0.13 (in log space) from both clip edges (eps 0.2).

    bf16 inputs move a log-prob by ~1e-2, so a token whose ratio lies on an edge flips between
    clipped and unclipped, and its whole gradient row appears or vanishes: a discontinuity of the
    objective, not a kernel error. The CPU tests keep straddling ratios (fp32 vs fp64)."""
    with torch.no_grad():
        logits = torch.einsum("bth,vh->btv", inputs["hidden"], inputs["weight"])
        logp = torch.log_softmax(logits, -1).gather(-1, inputs["targets"][..., None])[..., 0]
        del logits
    g = torch.Generator(device=logp.device).manual_seed(seed)
    offsets = torch.tensor([-0.6, -0.05, 0.05, 0.6], device=logp.device)
    pick = torch.randint(0, 4, logp.shape, generator=g, device=logp.device)
    return dict(inputs, old_logprobs=logp - offsets[pick])  # log ratio = offset


def _gpu_compare(impl, b, t, h, v, device="cuda", **kw):
    inputs = make_inputs(b, t, h, v, device=device, hidden_scale=0.25, seed=11)  # logits ~ N(0, 1)
    inputs = _away_from_clip_edges(inputs)
    # The oracle computes in fp32 on the very bf16 values the kernel receives (flash-attention's rule):
    # input rounding is then no part of the error, and the budget is the bf16 reference's own error.
    lowp = dict(inputs, hidden=inputs["hidden"].bfloat16(), weight=inputs["weight"].bfloat16())
    fp32 = dict(inputs, hidden=lowp["hidden"].float(), weight=lowp["weight"].float())
    ref32 = run(grpo_loss_ref, fp32, beta=0.04, **kw)
    ref16 = run(grpo_loss_ref, lowp, beta=0.04, **kw)
    out = run(grpo_loss, lowp, beta=0.04, impl=impl, **kw)
    for i, name in ((0, "loss"), (2, "grad hidden"), (3, "grad weight")):
        assert_close_to_ref(out[i], ref32[i], ref16[i], floor=1e-6 * ref32[i].abs().max().item(), name=name)
    for key in ("logprobs", "entropy"):
        assert_close_to_ref(out[1][key], ref32[1][key], ref16[1][key], floor=1e-5, name=key)
    logp, ent = token_logprobs(lowp["hidden"], lowp["weight"], lowp["targets"], impl=impl)
    assert_close_to_ref(logp, ref32[1]["logprobs"], ref16[1]["logprobs"], floor=1e-5, name="token_logprobs")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
def test_grpo_loss_bf16_matches_fp32_reference_on_gpu(shape, impl, monkeypatch):
    monkeypatch.setattr(G, "CHUNK_BYTES", 768 << 20)
    _gpu_compare(impl, *GPU_SHAPES[shape])


@pytest.mark.gpu
def test_grpo_loss_bf16_many_chunks_accumulate_grad_weight_within_tolerance_on_gpu(monkeypatch):
    b, t, h, v = GPU_SHAPES["qwen_head"]
    monkeypatch.setattr(G, "CHUNK_BYTES", 256 * v * 2)  # 4 chunks of 256 tokens
    _gpu_compare("chunked", b, t, h, v, agg="token_mean")


@pytest.mark.gpu
def test_linear_cross_entropy_bf16_matches_fp32_reference_on_gpu(monkeypatch):
    monkeypatch.setattr(G, "CHUNK_BYTES", 768 << 20)
    b, t, h, v = GPU_SHAPES["deepseek_v3_head"]
    inputs = make_inputs(b, t, h, v, device="cuda", seed=12)
    targets = inputs["targets"].reshape(-1)
    outs = []
    hid16, w16 = (inputs["hidden"].reshape(-1, h) / 4).bfloat16(), inputs["weight"].bfloat16()
    for dtype, fn in (
        (torch.float32, linear_cross_entropy_ref),
        (torch.bfloat16, linear_cross_entropy_ref),
        (torch.bfloat16, linear_cross_entropy),
    ):
        hid = hid16.to(dtype).requires_grad_()  # every run sees the same bf16-representable values
        w = w16.to(dtype).requires_grad_()
        loss = fn(hid, w, targets, reduction="mean")
        loss.backward()
        outs.append((loss.detach(), hid.grad, w.grad))
    for i, name in enumerate(("loss", "grad hidden", "grad weight")):
        assert_close_to_ref(
            outs[2][i], outs[0][i], outs[1][i], floor=1e-6 * outs[0][i].abs().max().item(), name=name
        )
