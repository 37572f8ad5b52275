"""`format`: 1.0 when the response has R1's shape, else 0.0.

The shape: the response starts (after whitespace) with exactly one `<think>...</think>` holding
non-empty reasoning, followed by a non-empty answer with no further think tags. Options:
- `think_in_prompt`: the chat template already ends the prompt with `<think>` (DeepSeek-R1's
  template does), so the response begins inside the block and must not open another.
- `require_boxed`: the answer must contain a complete `\\boxed{...}`.
- `require_answer_tags`: the answer must be `<answer>...</answer>` (R1-Zero's template).
- `allow_empty_think`: accept `<think></think>` (R1 emits it for trivial chat turns).
"""

from __future__ import annotations

from r1core.rewards.registry import register
from r1core.rewards.text import THINK_CLOSE, THINK_OPEN, TooComplex, as_text, last_boxed


def _shape(text: str, think_in_prompt: bool, allow_empty_think: bool) -> tuple[str | None, str]:
    """(answer, reason): the answer after a well-formed think block, or None and why not."""
    body = text.lstrip()
    if not think_in_prompt:
        if not body.startswith(THINK_OPEN):
            return None, "no_think"
        body = body[len(THINK_OPEN) :]
    if THINK_OPEN in body or body.count(THINK_CLOSE) > 1:
        return None, "multiple_think"
    if THINK_CLOSE not in body:
        return None, "unclosed_think"
    reasoning, answer = body.split(THINK_CLOSE, 1)
    if not reasoning.strip() and not allow_empty_think:
        return None, "empty_think"
    if not answer.strip():
        return None, "empty_answer"
    return answer, "ok"


def _single_answer_tag(text: str) -> bool:
    if not (text.startswith("<answer>") and text.endswith("</answer>")):
        return False
    inner = text[len("<answer>") : -len("</answer>")]
    return bool(inner.strip()) and "<answer>" not in inner and "</answer>" not in inner


@register("format")
def format_reward(
    response,
    answer=None,
    *,
    think_in_prompt: bool = False,
    require_boxed: bool = False,
    require_answer_tags: bool = False,
    allow_empty_think: bool = False,
) -> tuple[float, str]:
    """Reasons: ok, non_utf8, no_think, multiple_think, unclosed_think, empty_think,
    empty_answer, no_boxed, no_answer_tags. `answer` (the gold) is ignored."""
    text = as_text(response)
    if text is None:
        return 0.0, "non_utf8"
    final, reason = _shape(text, think_in_prompt, allow_empty_think)
    if final is None:
        return 0.0, reason
    if require_answer_tags and not _single_answer_tag(final.strip()):
        return 0.0, "no_answer_tags"
    if require_boxed:
        try:
            boxed = last_boxed(final)
        except TooComplex:
            boxed = None
        if not boxed or not boxed.strip():
            return 0.0, "no_boxed"
    return 1.0, "ok"
