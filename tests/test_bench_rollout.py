"""bench_rollout's decode roofline accounting (benchmarks/rollout_roofline.py), on the CPU at the tiny
preset."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from rollout_roofline import decode_bytes, profile_decode, record_routing, uniform_distinct  # noqa: E402

from r1core.model import Transformer, presets  # noqa: E402
from r1core.rollout import BuiltinEngine, SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def model() -> Transformer:
    args = presets["tiny"]
    args.n_mtp_modules = 0
    torch.manual_seed(0)
    return Transformer(args).eval()


def test_decode_bytes_with_every_expert_visited_is_every_weight_once_plus_rows_and_cache(model):
    a = model.args
    n_moe = len(model.moe_layers())
    B, ctx, kv_tok = 3, 10.5, 768
    parts = decode_bytes(model, B, ctx, [a.n_routed_experts] * n_moe, kv_tok)
    all_weights = sum(p.numel() * p.element_size() for p in model.parameters())
    embed_table = model.embed.weight.numel() * model.embed.weight.element_size()
    expected = all_weights - embed_table + B * a.dim * 4 + B * ctx * kv_tok  # fp32 tiny model
    assert parts["total"] == pytest.approx(expected)
    one_expert = decode_bytes(model, B, ctx, [1] * n_moe, kv_tok)
    per_expert = sum(p.numel() * 4 for p in model.moe_layers()[0].experts.parameters()) / a.n_routed_experts
    assert parts["total"] - one_expert["total"] == pytest.approx(
        n_moe * (a.n_routed_experts - 1) * per_expert
    )


def test_one_token_visits_exactly_top_k_experts_per_layer_and_uniform_expectation_limits(model):
    engine = BuiltinEngine(model, max_batch=4, max_len=32)
    engine.generate([[5, 6, 7], [8, 9], [10], [11, 12]], 1, SamplingParams(max_new_tokens=3, seed=0))
    K, E = model.args.n_activated_experts, model.args.n_routed_experts
    one = record_routing(engine, 1)
    assert one == [K] * len(model.moe_layers())
    four = record_routing(engine, 4)
    assert all(K <= d <= min(4 * K, E) for d in four)
    assert uniform_distinct(E, K, 1) == pytest.approx(K)
    assert uniform_distinct(E, K, 10_000) == pytest.approx(E)


def test_profile_decode_reports_the_matmuls_of_a_step_as_shares_of_its_time(model):
    r = profile_decode(model, 2, 6, "dense", top=50, replays=2)
    names = [k[0] for k in r["kernels"]]
    assert r["S"] == 10 and r["step_ms"] > 0  # eager on the CPU: the exact key range, prompt + 4
    assert any("mm" in n for n in names)  # the projections and experts
    assert 0 < sum(k[2] for k in r["kernels"]) <= 100 + 1e-6
    assert all(a[1] >= b[1] for a, b in zip(r["kernels"], r["kernels"][1:]))  # sorted, largest first


def test_the_sort_baseline_of_expert_order_gives_the_engines_permutation_and_offsets():
    from bench_rollout import sort_expert_order

    from r1core.rollout.decode import expert_order

    g = torch.Generator().manual_seed(3)
    for E, P in ((8, 64), (32, 1024)):
        flat = torch.randint(0, E, (P,), generator=g)
        for a, b in zip(sort_expert_order(flat, E), expert_order(flat, E)):
            assert a.dtype == b.dtype and torch.equal(a, b)
