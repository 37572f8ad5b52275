"""Rule rewards, their counted failure reasons and the reward-model hook.

The code sandbox itself (hostile programs, isolation layers) is tested in test_sandbox.py; code
reward tests here use 1-2 s limits; the whole file is meant to stay well under a minute of CPU.
"""

import ast
import math
import os
import subprocess
import sys
import threading
import time
from fractions import Fraction

import pytest

from r1core import rewards
from r1core.rewards import registry
from r1core.rewards.language import strip_math, word_counts
from r1core.rewards.text import TooComplex, extract_answer, extract_code, last_boxed, split_think

FAST = rewards.SandboxLimits(wall_s=5, cpu_s=2, memory_mb=512)


def scored(name, response, answer=None, **kw):
    """(score, counted reasons) through a private RewardStats, so counts are exact."""
    stats = rewards.RewardStats()
    score = rewards.get(name, stats)(response, answer, **kw)
    return score, stats.snapshot().get(name, {})


# ---------------------------------------------------------------- registry


def test_names_lists_every_registered_reward():
    assert rewards.names() == [
        "code",
        "countdown",
        "format",
        "language_consistency",
        "math_accuracy",
        "reward_model",
    ]


def test_unknown_reward_raises_keyerror_listing_registered_names():
    with pytest.raises(
        KeyError, match="unknown reward 'nope'; registered: code, countdown, format, language_consistency"
    ):
        rewards.get("nope")


def test_register_rejects_duplicates_and_counts_internal_errors_as_zero():
    @rewards.register("_test_boom")
    def boom(response, answer):
        raise ZeroDivisionError

    try:
        with pytest.raises(rewards.RewardConfigError, match="already registered"):
            rewards.register("_test_boom")(boom)
        assert scored("_test_boom", "x") == (0.0, {"internal_error": 1})
    finally:
        registry._REGISTRY.pop("_test_boom")


def test_scores_are_clamped_to_unit_interval_and_nan_is_zero():
    values = iter([1.5, -2.0, float("nan")])
    rewards.register("_test_raw")(lambda response, answer: (next(values), "raw"))
    try:
        assert [scored("_test_raw", "x")[0] for _ in range(3)] == [1.0, 0.0, 0.0]
    finally:
        registry._REGISTRY.pop("_test_raw")


def test_unknown_kwarg_is_a_config_error_not_a_zero():
    with pytest.raises(rewards.RewardConfigError, match="unexpected keyword argument 'lang'"):
        rewards.get("format")("<think>a</think>b", None, lang="en")


def test_stats_count_from_many_threads_and_reset_atomically():
    stats = rewards.RewardStats()

    def work():
        for _ in range(500):
            stats.record("math_accuracy", "wrong")
            stats.record("code", "timeout")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.snapshot(reset=True) == {"math_accuracy": {"wrong": 4000}, "code": {"timeout": 4000}}
    assert stats.snapshot() == {}
    stats.record("format", "ok", 2)
    assert stats.flat() == {"format/ok": 2}
    stats.reset()
    assert stats.flat() == {}


def test_combine_is_a_weighted_sum_and_rejects_weights_without_rewards():
    computed = {"math_accuracy": 1.0, "format": 0.5, "code": 1.0}
    assert rewards.combine(computed, {"math_accuracy": 1.0, "format": 2.0}) == 2.0
    with pytest.raises(KeyError, match=r"\['language_consistency'\]"):
        rewards.combine({"format": 1.0}, {"format": 1.0, "language_consistency": 0.1})


def test_rewards_package_imports_neither_torch_nor_the_model():
    # Rewards run in rollout workers; the sandbox runner and math worker run without r1core at all.
    package = os.path.dirname(rewards.__file__)
    for name in sorted(os.listdir(package)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(package, name)) as f:
            tree = ast.parse(f.read())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        roots = {m.split(".")[0] for m in imported}
        assert "torch" not in roots and not any(m.startswith("r1core.model") for m in imported), name
        if (name.startswith("_") and name != "__init__.py") or name == "mathcheck.py":
            assert "r1core" not in roots, name
    # And at run time (conftest already imported torch here, so ask a fresh interpreter).
    code = (
        "import sys, r1core.rewards; print(sorted(m for m in ('torch', 'r1core.model') if m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "[]\n"


# ---------------------------------------------------------------- answer extraction


def test_split_think_reads_answer_only_after_the_last_close_tag():
    assert (split_think("<think>r</think>a").reasoning, split_think("<think>r</think>a").final) == ("r", "a")
    assert split_think("<think>never closed").final is None
    assert (split_think("plain").reasoning, split_think("plain").final) == (None, "plain")


def test_extract_answer_prefers_boxed_then_tags_then_answer_is_then_last_number():
    assert extract_answer("<answer>7</answer> so \\boxed{\\frac{1}{2}} then 9") == ("\\frac{1}{2}", "boxed")
    assert extract_answer("<answer> $7$ </answer> then 9") == ("7", "tag")
    assert extract_answer("Thus the final answer is: $x = 3$.\nCheck: 5") == ("x = 3", "answer_is")
    assert extract_answer("The final answer is $$-2.5$$. I hope it is correct.") == ("-2.5", "answer_is")
    assert extract_answer("**Answer:** 42. Done, 7 steps.") == ("42", "answer_is")
    assert extract_answer("we get 12 apples, then -3.5 more") == ("-3.5", "last_number")
    assert extract_answer("no digits") == (None, "none")


def test_last_boxed_balances_braces_and_skips_a_truncated_last_box():
    assert last_boxed("\\boxed{\\frac{1}{2}} and \\boxed{\\sqrt{2}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed("\\boxed 5 apples") == "5"
    assert last_boxed("\\fbox{4}") == "4"
    with pytest.raises(TooComplex):
        last_boxed("\\boxed{" + "{" * 40 + "}" * 40 + "}", max_depth=32)


# ---------------------------------------------------------------- math_accuracy


@pytest.mark.parametrize(
    "response, gold",
    [
        ("<think>half</think> The answer is \\boxed{\\frac12}.", "0.5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("<think>r</think> The answer is 2/4", "1/2"),
        ("<think>solve</think> <answer>x=3</answer>", 3),
        ("\\boxed{1,234,567}", 1234567),
        ("The answer is $0.5$", Fraction(1, 2)),
        ("\\boxed{\\sqrt{8}}", "$\\boxed{2\\sqrt{2}}$"),
    ],
)
def test_math_accuracy_accepts_equivalent_answers(response, gold):
    assert scored("math_accuracy", response, gold) == (1.0, {"correct": 1})


def test_math_accuracy_rejects_a_different_answer():
    assert scored("math_accuracy", "<think>r</think>\\boxed{\\frac{1}{3}}", "0.5") == (0.0, {"wrong": 1})


def test_math_accuracy_never_reads_the_answer_out_of_the_reasoning():
    assert scored("math_accuracy", "<think>it is \\boxed{7}</think> I give up.", "7") == (
        0.0,
        {"no_answer": 1},
    )
    assert scored("math_accuracy", "<think>\\boxed{7}</think> \\boxed{8}", "7") == (0.0, {"wrong": 1})
    assert scored("math_accuracy", "<think>so \\boxed{7} and then", "7") == (0.0, {"no_answer": 1})


def test_math_accuracy_counts_malformed_and_hostile_answers():
    deep = "\\boxed{" + "{" * 200 + "1" + "}" * 200 + "}"
    parens = "The answer is " + "(" * 100 + "1" + ")" * 100
    assert scored("math_accuracy", deep, "1") == (0.0, {"too_complex": 1})
    assert scored("math_accuracy", parens, "1") == (0.0, {"too_complex": 1})
    assert scored("math_accuracy", "\\boxed{" + "1" * 5000 + "}", "1") == (0.0, {"too_complex": 1})
    assert scored("math_accuracy", b"\\boxed{\xff}", "1") == (0.0, {"non_utf8": 1})
    assert scored("math_accuracy", "\\boxed{1}\udcff", "1") == (0.0, {"non_utf8": 1})
    assert scored("math_accuracy", "words " * 200_000, "1") == (0.0, {"no_answer": 1})
    assert scored("math_accuracy", "\\boxed{1}", "") == (0.0, {"bad_gold": 1})
    assert scored("math_accuracy", "\\boxed{9**9**9}", "3") == (0.0, {"wrong": 1})


def test_math_accuracy_times_out_on_a_power_tower_within_its_budget():
    start = time.monotonic()
    assert scored("math_accuracy", "\\boxed{9^{9^{9}}}", "5", timeout_s=1) == (0.0, {"timeout": 1})
    assert time.monotonic() - start < 6


def test_math_accuracy_off_the_main_thread_uses_the_worker_process():
    out = {}

    def work():
        out["ok"] = scored("math_accuracy", "\\boxed{0.5}", "1/2")
        out["tower"] = scored("math_accuracy", "\\boxed{9^{9^{9}}}", "5", timeout_s=1)
        with pytest.raises(rewards.RewardConfigError, match="main thread"):
            rewards.get("math_accuracy")("\\boxed{1}", "1", isolation="inline")
        out["done"] = True

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=120)
    assert out == {"ok": (1.0, {"correct": 1}), "tower": (0.0, {"timeout": 1}), "done": True}


# ---------------------------------------------------------------- format


@pytest.mark.parametrize(
    "response, kwargs, expected",
    [
        ("<think>reason</think>\n\\boxed{4}", {}, (1.0, {"ok": 1})),
        ("  <think>reason</think> 4", {}, (1.0, {"ok": 1})),
        ("Sure! <think>reason</think> 4", {}, (0.0, {"no_think": 1})),
        ("<think>a</think><think>b</think> 4", {}, (0.0, {"multiple_think": 1})),
        ("<think>a</think> 4 </think>", {}, (0.0, {"multiple_think": 1})),
        ("<think>still thinking", {}, (0.0, {"unclosed_think": 1})),
        ("<think> \n</think> 4", {}, (0.0, {"empty_think": 1})),
        ("<think></think> 4", {"allow_empty_think": True}, (1.0, {"ok": 1})),
        ("<think>reason</think>  \n", {}, (0.0, {"empty_answer": 1})),
        ("<think>reason</think> 4", {"require_boxed": True}, (0.0, {"no_boxed": 1})),
        ("<think>\\boxed{4}</think> 4", {"require_boxed": True}, (0.0, {"no_boxed": 1})),
        ("<think>r</think> <answer>4</answer>", {"require_answer_tags": True}, (1.0, {"ok": 1})),
        (
            "<think>r</think> 4 <answer>4</answer>",
            {"require_answer_tags": True},
            (0.0, {"no_answer_tags": 1}),
        ),
        ("reason</think> 4", {"think_in_prompt": True}, (1.0, {"ok": 1})),
        ("<think>reason</think> 4", {"think_in_prompt": True}, (0.0, {"multiple_think": 1})),
        (b"<think>r</think>\xff", {}, (0.0, {"non_utf8": 1})),
    ],
)
def test_format_reward_cases(response, kwargs, expected):
    assert scored("format", response, None, **kwargs) == expected


# ---------------------------------------------------------------- language_consistency


def test_strip_math_removes_closed_spans_and_leaves_unclosed_openers():
    assert strip_math("a $x$ b $$y$$ c \\(z\\) d \\[w\\] e $ f \\( g") == "a   b   c   d   e $ f \\( g"


def test_word_counts_follow_the_documented_definition():
    text = "Let $x^2 + ab = 3$, so x = 3 and \\frac{1}{2} is 这个 Café, привет θ."
    # en: Let, so, and, is; zh: 这, 个; other: Café, привет. Neutral: math, x, \frac, θ, digits.
    assert word_counts(text) == {"en": 4, "zh": 2, "other": 2}


@pytest.mark.parametrize(
    "response, lang, expected",
    [
        ("<think>We compute the sum first.</think> 4", "en", (1.0, {"ok": 1})),
        ("<think>We compute 这个 value</think> 4", "en", (0.6, {"mixed": 1})),
        ("<think>We compute 这个 value</think> 4", "zh", (0.4, {"mixed": 1})),
        ("<think>我们计算 x 的值：2+3=5</think> 5", "zh", (1.0, {"ok": 1})),
        ("<think>English reasoning here</think> 中文答案", "en", (1.0, {"ok": 1})),
        ("<think>$1+1=2$, 3 * 4 = 12</think> 12", "en", (0.0, {"no_words": 1})),
        ("Café 很好", "zh", (2 / 3, {"mixed": 1})),
    ],
)
def test_language_consistency_is_the_target_share_of_reasoning_words(response, lang, expected):
    score, reasons = scored("language_consistency", response, None, lang=lang)
    assert (score, reasons) == (pytest.approx(expected[0], abs=1e-12), expected[1])


def test_language_consistency_rejects_unsupported_languages():
    with pytest.raises(rewards.RewardConfigError, match="supports lang in"):
        rewards.get("language_consistency")("<think>a</think>", None, lang="fr")


# ---------------------------------------------------------------- code


def program(body: str) -> str:
    return f"<think>plan</think>\nHere:\n```python\n{body}\n```\n"


SUM_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 7\n", "output": "12"}]


def test_extract_code_takes_the_last_python_block():
    assert extract_code("```python\na=1\n```\ntext\n```py\nb=2\n```") == "b=2\n"
    assert extract_code("```python\nunclosed") is None


def test_code_passing_program_scores_one():
    body = "a, b = map(int, input().split())\nprint(a + b)   "
    assert scored("code", program(body), SUM_TESTS, limits=FAST) == (1.0, {"passed": 1})
    apps = {"inputs": ["1 2\n", "5 7\n"], "outputs": ["3\n", "12\n"]}
    assert scored("code", program(body), apps, limits=FAST) == (1.0, {"passed": 1})


def test_code_failing_program_scores_pass_fraction_or_zero_in_all_mode():
    body = "a, b = map(int, input().split())\nprint(3)"
    assert scored("code", program(body), SUM_TESTS, limits=FAST) == (0.5, {"wrong": 1})
    assert scored("code", program(body), {"tests": SUM_TESTS}, limits=FAST, mode="all") == (0.0, {"wrong": 1})


def test_code_limits_given_as_a_mapping_are_validated():
    with pytest.raises(rewards.RewardConfigError, match="invalid sandbox limits"):
        rewards.get("code")(program("print(3)"), SUM_TESTS, limits={"wall_s": 0})
    with pytest.raises(rewards.RewardConfigError, match="unexpected keyword argument 'walls'"):
        rewards.get("code")(program("print(3)"), SUM_TESTS, limits={"walls": 1})


def test_code_without_a_program_after_think_is_no_code():
    assert scored("code", "<think>```python\nprint(3)\n```</think> done", SUM_TESTS) == (0.0, {"no_code": 1})
    assert scored("code", "<think>x</think> ```python\n\n```", SUM_TESTS) == (0.0, {"no_code": 1})
    assert scored("code", program("print(3)"), [{"input": "1"}]) == (0.0, {"bad_tests": 1})


def test_code_call_tests_use_fn_name_or_a_solution_class():
    tests = {
        "fn_name": "add",
        "tests": [{"args": [1, 2], "output": 3}, {"args": [[1], [2]], "output": [1, 2]}],
    }
    plain = "def add(a, b):\n    print('noise')\n    return a + b"
    assert scored("code", program(plain), tests, limits=FAST) == (1.0, {"passed": 1})
    leetcode = (
        "class Solution:\n    def add(self, a, b):\n        return a + b if isinstance(a, int) else 1 / 0"
    )
    assert scored("code", program(leetcode), tests, limits=FAST) == (0.5, {"runtime_error": 1})
    assert scored("code", program("def other(): pass"), tests, limits=FAST) == (0.0, {"no_function": 1})


def test_score_batch_runs_code_in_a_pool_in_input_order():
    stats = rewards.RewardStats()
    responses = [program("print(sum(map(int, input().split())))"), "no code", program("print(0)")]
    scores = rewards.score_batch("code", responses, [SUM_TESTS] * 3, limits=FAST, stats=stats, max_workers=2)
    assert scores == [1.0, 0.0, 0.0]
    assert stats.snapshot() == {"code": {"passed": 1, "no_code": 1, "wrong": 1}}


def test_score_batch_deadline_returns_without_waiting_for_slow_samples():
    stats = rewards.RewardStats()
    slow = program("import time\ntime.sleep(30)")
    start = time.monotonic()
    limits = rewards.SandboxLimits(wall_s=3, cpu_s=1)
    scores = rewards.score_batch(
        "code", [slow, slow], [SUM_TESTS] * 2, limits=limits, deadline_s=0.5, stats=stats
    )
    assert (scores, stats.snapshot()) == ([0.0, 0.0], {"code": {"timeout": 2}})
    assert time.monotonic() - start < 2


def test_score_batch_math_runs_in_the_calling_thread():
    stats = rewards.RewardStats()
    scores = rewards.score_batch("math_accuracy", ["\\boxed{2}", "\\boxed{3}"], ["2", 2], stats=stats)
    assert (scores, stats.snapshot()) == ([1.0, 0.0], {"math_accuracy": {"correct": 1, "wrong": 1}})


# ---------------------------------------------------------------- reward model


@pytest.fixture
def no_reward_model():
    rewards.set_reward_model(None)
    yield
    rewards.set_reward_model(None)


def char_model(**kw):
    # One token per character; the scalar is the length minus 10, so sigmoid values are exact.
    return rewards.ScalarHeadRewardModel(lambda s: [ord(c) for c in s], lambda ids: len(ids) - 10, **kw)


def test_reward_model_raises_until_one_is_set(no_reward_model):
    with pytest.raises(rewards.RewardModelError, match="set_reward_model"):
        rewards.get("reward_model")("response", None)
    with pytest.raises(rewards.RewardConfigError, match="no score"):
        rewards.set_reward_model(object())


def test_scalar_head_reward_model_maps_scores_through_a_sigmoid(no_reward_model):
    rewards.set_reward_model(char_model())
    assert scored("reward_model", "cdefghij", None, prompt="ab") == (0.5, {"scored": 1})
    assert scored("reward_model", "cdefghijkl", None, prompt="ab")[0] == 1 / (1 + math.exp(-2))
    rewards.set_reward_model(char_model(), transform="clip")
    assert scored("reward_model", "x" * 30, None) == (1.0, {"scored": 1})
    assert char_model(max_tokens=3).token_ids("abc", "de") == [ord("c"), ord("d"), ord("e")]


def test_score_batch_reward_model_makes_one_batched_call(no_reward_model):
    calls = []

    def head(batch):
        calls.append(len(batch))
        return [float("nan") if len(ids) == 1 else len(ids) - 2 for ids in batch]

    rewards.set_reward_model(rewards.ScalarHeadRewardModel(lambda s: [0] * len(s), head, batched=True))
    stats = rewards.RewardStats()
    scores = rewards.score_batch(
        "reward_model", ["b", "", b"\xff"], [None] * 3, prompts=["a", "z", "q"], stats=stats
    )
    assert (scores, calls) == ([0.5, 0.0, 0.0], [2])
    assert stats.snapshot() == {"reward_model": {"scored": 1, "non_finite": 1, "non_utf8": 1}}


def test_a_failing_reward_model_stops_the_job(no_reward_model):
    rewards.set_reward_model(rewards.ScalarHeadRewardModel(list, lambda ids: 1 / 0))
    with pytest.raises(rewards.RewardModelError, match="ZeroDivisionError"):
        rewards.get("reward_model")("x", None)


def test_countdown_reward_checks_the_boxed_expression_against_numbers_and_target():
    from r1core import rewards

    stats = rewards.RewardStats()
    r = rewards.get("countdown", stats=stats)
    assert r("<think>8+3=11</think> \\boxed{(12-4)+(8+3)}", "19", numbers=[12, 8, 3, 4]) == 1.0
    assert r("<think>..</think> \\boxed{12*4}", "19", numbers=[12, 8, 3, 4]) == 0.0  # wrong value
    assert r("<think>..</think> \\boxed{12+7}", "19", numbers=[12, 8, 3, 4]) == 0.0  # 7 not given
    assert r("<think>..</think> \\boxed{__import__('os')}", "19", numbers=[12]) == 0.0  # never executed
    assert (
        r("<think>\\boxed{(12-4)+(8+3)}</think> no box", "19", numbers=[12, 8, 3, 4]) == 0.0
    )  # only after </think>
    assert stats.snapshot() == {"countdown": {"correct": 1, "wrong": 3, "no_answer": 1}}
    with pytest.raises(rewards.RewardConfigError, match="needs numbers"):
        r("<think>x</think> \\boxed{1}", "1")


def test_mathcheck_plain_integer_path_gives_math_verifys_verdict():
    from r1core.rewards import mathcheck

    values = [
        "7",
        "07",
        "+7",
        "-7",
        "-0",
        "0",
        " 12 ",
        "1234567",
        "1234568",
        "999999999999999",
        "-999999999999999",
        "100",
        "1000",
    ]
    pairs = [(p, g) for p in values for g in values]
    fast = 0
    for p, g in pairs:
        if mathcheck._plain_int(p) is not None and mathcheck._plain_int(g) is not None:
            fast += 1
        assert mathcheck.check(p, g) == mathcheck._verify(p, g, 3), (p, g)
    assert fast == len(pairs)
    # not plain integers: math-verify decides (decimals, 16+ digits, LaTeX, non-ASCII digits)
    for s in ("12.0", "1234567890123456", "\\frac{14}{2}", "\u0663", "1,000", "7%"):
        assert mathcheck._plain_int(s) is None
    assert mathcheck.check("12.0", "12") == "correct"
    assert mathcheck.check("\\frac{14}{2}", "7") == "correct"
