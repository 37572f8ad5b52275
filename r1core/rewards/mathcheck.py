"""Compare one extracted answer with a gold answer through math-verify.

Self-contained on purpose (standard library + math_verify only): `_math_worker.py` loads this file
by path in a separate interpreter that must not import r1core (which pulls in torch).

math-verify bounds each parse and each comparison with its own `signal.alarm` timeouts, so `check`
must run on the main thread of its process; `math_accuracy.py` decides where it runs. Never str()
a parsed expression here: printing a sympy tower like 9^(9^9) can itself run for minutes.
"""

from __future__ import annotations

import functools
import re

CORRECT, WRONG, PARSE_ERROR, TIMEOUT, BAD_GOLD = "correct", "wrong", "parse_error", "timeout", "bad_gold"


def _config():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return [LatexExtractionConfig(), ExprExtractionConfig()]


def _wrap(answer: str) -> str:
    # math-verify finds LaTeX only inside math delimiters: `\frac12` alone parses to nothing.
    # An unescaped `$` inside the answer would end the math early, so drop those.
    body, out, i = answer, [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            out.append(body[i : i + 2])
            i += 2
            continue
        if body[i] != "$":
            out.append(body[i])
        i += 1
    return "$" + "".join(out) + "$"


def _parse(answer: str, timeout_s: int) -> list:
    from math_verify import parse

    return parse(_wrap(answer), _config(), parsing_timeout=timeout_s, raise_on_error=True)


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout_s: int) -> tuple:
    # The same few thousand gold answers come back every epoch.
    return tuple(_parse(gold, timeout_s))


def _same_text(a: str, b: str) -> bool:
    return "".join(a.split()) == "".join(b.split())


# A signed integer of at most 15 digits: math-verify reads it as that integer exactly, so two such
# answers are equal iff their values are (tests compare this path with math-verify). Most rollout
# answers of the arithmetic tasks are plain integers, and math-verify's LaTeX parse costs ~1-5 ms each.
_PLAIN_INT = re.compile(r"\s*[+-]?[0-9]{1,15}\s*")


def _plain_int(s: str) -> int | None:
    return int(s) if _PLAIN_INT.fullmatch(s) else None


def check(pred: str, gold: str, timeout_s: int = 3) -> str:
    """One of CORRECT, WRONG, PARSE_ERROR, TIMEOUT, BAD_GOLD. Main thread only (signal.alarm)."""
    if _same_text(pred, gold):
        return CORRECT
    p, g = _plain_int(pred), _plain_int(gold)
    if p is not None and g is not None:
        return CORRECT if p == g else WRONG
    return _verify(pred, gold, timeout_s)


def _verify(pred: str, gold: str, timeout_s: int) -> str:
    """check() through math-verify alone."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    try:
        golds = _parse_gold(gold, timeout_s)
    except (Exception, TimeoutException):
        return BAD_GOLD
    if not golds:
        return BAD_GOLD
    try:
        preds = _parse(pred, timeout_s)
    except TimeoutException:
        return TIMEOUT
    except Exception:  # noqa: BLE001 - any parser failure on model output is a parse error
        return PARSE_ERROR
    if not preds:
        return PARSE_ERROR
    # Pair by pair (not verify(golds, preds)) so a timeout is told apart from a wrong answer and a
    # failure on one reading (sympy vs. string) does not hide a match on the other.
    for g in golds:
        for p in preds:
            try:
                if verify(g, p, timeout_seconds=timeout_s, raise_on_error=True):
                    return CORRECT
            except TimeoutException:
                return TIMEOUT
            except Exception:  # noqa: BLE001 - sympy raises many types on odd expressions
                continue
    return WRONG
