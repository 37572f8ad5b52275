"""`language_consistency`: share of the reasoning's words that are in the target language.

DeepSeek-R1 (section 2.3.3) rewards "the proportion of target language words in the CoT" to stop
language mixing. The reasoning is the think block (the text after `<think>` when it never closes;
the whole response when there is no think block). Words, per script:
- Han (CJK ideographs, including extension A and compatibility ideographs): each character is one
  word, since Chinese writes no spaces and a character is roughly a morpheme. Target "zh".
- Letter runs (maximal runs of Unicode letters, split by anything else): one word each when at
  least two letters long. A run of ASCII letters only is English (target "en"); any other run
  (accented Latin, Cyrillic, kana, Hangul, ...) is a word of some other language.
Neutral (neither target nor other): digits, punctuation, whitespace, math symbols, single letters
(variables such as x, n, θ), LaTeX commands (`\\frac`, `\\alpha`) and everything inside inline or
display math (`$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]`).
Reasoning without a single word scores 0 (reason `no_words`): it shows no target language at all.
"""

from __future__ import annotations

import re

from r1core.rewards.registry import RewardConfigError, register
from r1core.rewards.text import as_text, split_think

_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef\U00030000-\U0003134f]")
_MATH_CLOSE = {"$$": "$$", "$": "$", "\\(": "\\)", "\\[": "\\]"}
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_LETTERS = re.compile(r"[^\W\d_]{2,}")

LANGUAGES = ("en", "zh")


def strip_math(text: str) -> str:
    """`text` with every closed math span replaced by a space, in linear time.

    A regex such as `\\((.*?)\\)` rescans to the end for every unclosed opener (quadratic on a
    hostile CoT); here an opener without a closer retires its kind for the rest of the text."""
    out, i = [], 0
    nxt = {o: text.find(o) for o in _MATH_CLOSE}
    while True:
        live = [(p, -len(o), o) for o, p in nxt.items() if p >= 0]
        if not live:
            break
        p, _, o = min(live)  # leftmost opener; `$$` before `$` at the same place
        end = text.find(_MATH_CLOSE[o], p + len(o))
        if end < 0:
            nxt[o] = -1  # no closer after p, hence none after any later opener of this kind
            continue
        out += [text[i:p], " "]
        i = end + len(_MATH_CLOSE[o])
        for kind, q in nxt.items():
            if 0 <= q < i:
                nxt[kind] = text.find(kind, i)
    out.append(text[i:])
    return "".join(out)


def word_counts(text: str) -> dict[str, int]:
    """{"en": ASCII words, "zh": Han characters, "other": other words} per the module doc."""
    text = _LATEX_COMMAND.sub(" ", strip_math(text))
    zh = len(_HAN.findall(text))
    en = other = 0
    for run in _LETTERS.findall(_HAN.sub(" ", text)):
        if run.isascii():
            en += 1
        else:
            other += 1
    return {"en": en, "zh": zh, "other": other}


@register("language_consistency")
def language_consistency(response, answer=None, *, lang: str = "en") -> tuple[float, str]:
    """Reasons: ok (all words in `lang`), mixed (some are not), no_words, non_utf8."""
    if lang not in LANGUAGES:
        raise RewardConfigError(f"language_consistency supports lang in {LANGUAGES}, got {lang!r}")
    text = as_text(response)
    if text is None:
        return 0.0, "non_utf8"
    split = split_think(text)
    counts = word_counts(text if split.reasoning is None else split.reasoning)
    total = sum(counts.values())
    if total == 0:
        return 0.0, "no_words"
    share = counts[lang] / total
    return share, ("ok" if share == 1.0 else "mixed")
