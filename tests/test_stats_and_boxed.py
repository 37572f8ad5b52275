"""Held-out statistics (pass@k, bootstrap intervals, paired verdicts) and R1's boxed-answer rule."""

import math

import pytest

from r1core import rewards
from r1core.pipeline.report import comparisons, split_constant
from r1core.rl.stats import Estimate, bootstrap_mean, paired_difference, pass_at_k, pass_at_k_curve


# ---------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (4, 1, 2, 1 - 3 / 6),  # 1 - C(3,2)/C(4,2)
        (5, 2, 3, 1 - 1 / 10),  # 1 - C(3,3)/C(5,3)
        (16, 4, 1, 4 / 16),  # pass@1 is the share correct
        (8, 0, 8, 0.0),
        (8, 3, 6, 1.0),  # fewer wrong samples than k: some draw is correct
        (10, 5, 4, 1 - 5 / 210),  # 1 - C(5,4)/C(10,4)
    ],
)
def test_pass_at_k_matches_the_binomial_formula(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_curve_is_monotone_and_averages_problems():
    curve = pass_at_k_curve([0, 1, 4], 4)
    assert curve[1] == pytest.approx((0 + 0.25 + 1) / 3)
    assert curve[4] == pytest.approx((0 + 1 + 1) / 3)
    assert all(curve[k] <= curve[k + 1] for k in range(1, 4))


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)


# ---------------------------------------------------------------------------- intervals and verdicts


def test_bootstrap_interval_of_a_fair_coin_matches_the_normal_approximation():
    values = [0.0, 1.0] * 50
    est = bootstrap_mean(values, resamples=4000, seed=1)
    se = math.sqrt(sum((v - 0.5) ** 2 for v in values) / 99 / 100)  # 0.0503
    assert est.mean == 0.5 and est.se == pytest.approx(se)
    assert est.lo == pytest.approx(0.5 - 1.96 * se, abs=0.015) and est.hi == pytest.approx(
        0.5 + 1.96 * se, abs=0.015
    )


def test_constant_values_have_a_zero_width_interval():
    est = bootstrap_mean([0.25] * 7)
    assert (est.mean, est.se, est.lo, est.hi) == (0.25, 0.0, 0.25, 0.25)


@pytest.mark.parametrize(
    "lo,hi,verdict",
    [
        (0.01, 0.2, "above"),
        (-0.2, -0.01, "below"),
        (-0.01, 0.2, "no significant change"),
        (0.0, 0.1, "no significant change"),
    ],
)
def test_verdict_is_decided_by_the_interval_not_the_sign(lo, hi, verdict):
    assert (
        Estimate(mean=0.05 if verdict != "below" else -0.05, se=0.03, lo=lo, hi=hi, n=100).verdict()
        == verdict
    )


def test_paired_difference_removes_the_spread_that_both_models_share():
    base = [i / 99 for i in range(100)]  # problems from easy to hard
    better = [v + 0.05 for v in base]  # the same problems, each 0.05 better
    est = paired_difference(base, better)
    assert est.mean == pytest.approx(0.05) and est.lo == pytest.approx(0.05) and est.verdict() == "above"
    unpaired_se = math.hypot(bootstrap_mean(base).se, bootstrap_mean(better).se)
    assert unpaired_se > 0.05 / 2  # compared unpaired, the same gain would be within two standard errors


def test_a_positive_difference_inside_the_noise_is_no_significant_change():
    base = [0.0] * 100
    other = [1.0, -1.0] * 49 + [1.0, 0.0]  # mean +0.01, one standard error about 0.1
    est = paired_difference(base, other)
    assert est.mean > 0 and est.verdict() == "no significant change"


def test_paired_difference_needs_the_same_problems():
    with pytest.raises(ValueError, match="same problems"):
        paired_difference([0.0, 1.0], [1.0])


def test_report_compares_with_the_first_eval_and_the_named_baseline():
    k = 4

    def ev(counts):
        return {"k": k, "per_problem_correct": counts, "per_problem_pass1": [c / k for c in counts]}

    evals = [
        ("eval_base", {}, ev([0] * 60)),
        ("eval_sft", {}, ev([2] * 60)),
        ("eval_r1", {}, ev([2] * 30 + [4] * 30)),
        ("eval_x", {}, ev([1] * 10)),
    ]
    rows = comparisons(evals, {"eval_r1": "eval_sft"})
    got = {(r["model"], r["against"]): r for r in rows}
    assert got[("eval_sft", "eval_base")]["diff"] == pytest.approx(0.5)
    assert got[("eval_sft", "eval_base")]["verdict"] == "above"
    assert got[("eval_r1", "eval_sft")]["diff"] == pytest.approx(0.25)
    assert got[("eval_r1", "eval_sft")]["verdict"] == "above"
    assert (
        got[("eval_x", "eval_base")]["diff"] is None
        and "not comparable" in got[("eval_x", "eval_base")]["verdict"]
    )


def test_constant_curves_are_named_not_plotted():
    varying, constant = split_constant(
        {"kl": ([1, 2, 3], [0.0, 0.0, 0.0]), "reward": ([1, 2], [0.1, 0.3]), "empty": ([], [])}
    )
    assert list(varying) == ["reward"] and constant == {"kl": 0.0}


# ---------------------------------------------------------------------------- R1's boxed rule

ACC = rewards.get("math_accuracy")


@pytest.mark.parametrize(
    "response,strict,lenient",
    [
        ("2+2=4\n</think>\n\\boxed{4}", (1.0, "correct"), 1.0),  # boxed after think
        ("<think>\n2+2=4\n</think>\n\\boxed{4}", (1.0, "correct"), 1.0),
        ("2+2=4 so \\boxed{4}\n</think>\nthe answer is 4", (0.0, "no_boxed"), 1.0),  # boxed inside think only
        (
            "2+2=4\n</think>\n\\boxed{3} or rather \\boxed{4}",
            (1.0, "correct"),
            1.0,
        ),  # two boxes: the last counts
        ("2+2=4\n</think>\n\\boxed{4} or rather \\boxed{3}", (0.0, "wrong"), 0.0),
        ("2+2=4\n</think>\nThe answer is 4.", (0.0, "no_boxed"), 1.0),  # "the answer is"
        ("2+2=4\n</think>\n<answer>4</answer>", (0.0, "no_boxed"), 1.0),  # answer tags
        ("2+2=4\n</think>\nso 4", (0.0, "no_boxed"), 1.0),  # last number
        ("\\boxed{4}", (0.0, "no_boxed"), 1.0),  # no think block at all
        ("2+2=4 \\boxed{4}", (0.0, "no_boxed"), 1.0),
    ],
)
def test_math_accuracy_require_boxed_scores_only_a_box_after_think(response, strict, lenient):
    assert ACC.scored(response, "4", require_boxed=True) == strict
    assert ACC(response, "4") == lenient


def test_rl_rejection_and_eval_default_to_the_boxed_rule():
    import dataclasses
    import inspect

    from r1core.pipeline.config import STAGE_SECTIONS, JobConfig, StageKind
    from r1core.rl.evaluate import evaluate
    from r1core.rl.rewarding import Scorer

    # one job setting serves every stage that checks answers, and their hashes cover it
    assert {f.name: f.default for f in dataclasses.fields(JobConfig)}["require_boxed"] is True
    for kind in (
        StageKind.reasoning_rl,
        StageKind.all_scenario_rl,
        StageKind.rejection_sampling,
        StageKind.distill,
        StageKind.eval,
    ):
        assert "require_boxed" in STAGE_SECTIONS[kind]
    assert inspect.signature(evaluate).parameters["require_boxed"].default is True
    from r1core.data.tasks import Problem

    p = Problem(prompt="2+2=", answer="4", task="arithmetic")
    assert Scorer({"accuracy": 1.0}, require_boxed=True).score("4\n</think>\nthe answer is 4", p)[0] == 0.0
    assert Scorer({"accuracy": 1.0}).score("4\n</think>\nthe answer is 4", p)[0] == 1.0
