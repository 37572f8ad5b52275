"""Worked solutions in the R1 output format, and gold-answer extraction.

A worked solution is a short chain of thought inside <think>...</think> followed by the answer in
\\boxed{}, as DeepSeek-R1 writes it:

    <think>
    8+7=15
    5+6+1=12
    58+67=125
    </think>
    \\boxed{125}

Steps are column additions (with the carry written as +1), partial products for multi-digit
multiplication, and one line per operation otherwise: short enough for a ~128-token context and
regular enough for a tiny model to imitate.
"""

from __future__ import annotations

from r1core.data.tasks import Problem

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def render(steps: list[str], answer: str) -> str:
    """The R1 response text for a list of reasoning lines and a final answer."""
    return f"{THINK_OPEN}\n" + "\n".join(steps) + f"\n{THINK_CLOSE}\n\\boxed{{{answer}}}"


def _add_steps(a: int, b: int) -> list[str]:
    if a < 0 or b < 0 or max(a, b) < 10:
        return [f"{a}+{b}={a + b}"]
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for i in range(max(len(da), len(db))):
        digits = [d[i] for d in (da, db) if i < len(d)]
        s = sum(map(int, digits)) + carry
        if len(digits) == 1 and not carry:
            continue  # a digit copied down needs no line
        lines.append("+".join(digits) + ("+1" if carry else "") + f"={s}")
        carry = s // 10
    return lines + [f"{a}+{b}={a + b}"]


def _mul_steps(a: int, b: int) -> list[str]:
    if a < 10 or b < 10:
        return [f"{a}*{b}={a * b}"]
    # b's nonzero digits as place values: 45 -> [40, 5]
    parts = [int(d) * 10**k for k, d in enumerate(str(b)[::-1]) if d != "0"][::-1]
    lines = [f"{a}*{p}={a * p}" for p in parts]
    if len(parts) > 1:
        lines.append("+".join(str(a * p) for p in parts) + f"={a * b}")
    return lines


def _arithmetic_steps(operands: list[int], ops: list[str]) -> list[str]:
    # Products first (they bind tighter), then the sums and differences from left to right.
    lines: list[str] = []
    terms, signs = [operands[0]], []
    for op, b in zip(ops, operands[1:]):
        if op == "*":
            lines += _mul_steps(terms[-1], b)
            terms[-1] *= b
        else:
            terms.append(b)
            signs.append(op)
    acc = terms[0]
    for op, b in zip(signs, terms[1:]):
        if op == "+":
            lines += _add_steps(acc, b)
            acc += b
        else:
            lines.append(f"{acc}-{b}={acc - b}")
            acc -= b
    return lines


def _equation_steps(a: int, b: int, c: int, x: int) -> list[str]:
    move = f"{c}-{b}" if b > 0 else f"{c}+{-b}"
    return [f"{a}*x={move}={c - b}", f"x={c - b}/{a}={x}"]


def worked_solution(problem: Problem) -> str:
    """Chain of thought and boxed answer for a built-in task problem (see module docstring)."""
    m = problem.meta
    if problem.task == "arithmetic":
        return render(_arithmetic_steps(m["operands"], m["ops"]), problem.answer)
    if problem.task == "equations":
        return render(_equation_steps(m["a"], m["b"], m["c"], m["x"]), problem.answer)
    if problem.task == "countdown":
        # The boxed answer is the expression: the reward checks it with check_countdown.
        return render(list(m["steps"]), m["solution"])
    raise ValueError(f"no worked solution for task {problem.task!r}")


def pretrain_text(problem: Problem) -> str:
    """Plain pretraining line: the prompt, a space, the worked solution."""
    return problem.prompt + " " + worked_solution(problem)


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} in text (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 1, start + len("\\boxed{")
        body_start = i
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[body_start : i - 1].strip()
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: try an earlier one
    return None
