"""`countdown`: 1.0 when the boxed expression after `</think>` reaches the target with the given numbers.

The gold `answer` is the target; `numbers` (the problem's meta) lists what may be used, each at most
once. The expression is parsed by r1core.data's AST checker, which only admits integers from the
list, + - * / and parentheses, in exact fractions: nothing the model writes is ever executed.
"""

from __future__ import annotations

from r1core.data.tasks import check_countdown
from r1core.rewards.registry import RewardConfigError, register
from r1core.rewards.text import TooComplex, as_text, last_boxed, split_think


@register("countdown")
def countdown(response, answer, numbers=None, use_all: bool = False):
    if numbers is None:
        raise RewardConfigError("reward 'countdown' needs numbers= (the problem's meta['numbers'])")
    text = as_text(response)
    if text is None:
        return 0.0, "not_utf8"
    final = split_think(text).final
    if final is None:
        return 0.0, "no_answer"
    try:
        expr = last_boxed(final)
    except TooComplex:
        return 0.0, "too_complex"
    if expr is None:
        return 0.0, "no_answer"
    return (
        (1.0, "correct") if check_countdown(expr, list(numbers), answer, use_all=use_all) else (0.0, "wrong")
    )
