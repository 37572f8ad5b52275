"""Built-in verifiable task sets: seeded generators of problems with gold answers.

Prompts are short and regular because they drive the CPU demo, where a ~1M-parameter model with a
~128-token context must learn them in minutes (digits are single tokens in our tokenizer):

    arithmetic   "58+67="                 answer "125"    (operands joined by + - *, usual precedence)
    equations    "3*x+5=20 x="            answer "5"      (integer solution of a*x + b = c)
    countdown    "reach 24 with 3 4 5 6:" answer "24"     (gold is the target; any expression over a
                                                           sub-multiset of the numbers that evaluates
                                                           to it is correct: see check_countdown)

Train and held-out ("test") problems never overlap: a problem's split is a hash of its prompt text,
so the same prompt always lands in the same split whatever the seed or generator settings.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import random
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

SPLITS = ("train", "test")


@dataclass
class Problem:
    prompt: str
    answer: str  # gold answer as text (an integer for the built-in tasks)
    task: str
    meta: dict = field(default_factory=dict)


def split_of(prompt: str, test_fraction: float = 0.1) -> str:
    """'test' for a fixed `test_fraction` of all prompts (by SHA-256 of the text), else 'train'."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return "test" if h / 2**64 < test_fraction else "train"


# ---------------------------------------------------------------------------------------------
# arithmetic


def _check_range(name: str, value: int, lo: int, hi: int) -> None:
    if not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def eval_chain(operands: list[int], ops: list[str]) -> int:
    """Value of operands[0] ops[0] operands[1] ... with * binding tighter than + and -."""
    terms, signs, cur = [], ["+"], operands[0]
    for op, b in zip(ops, operands[1:]):
        if op == "*":
            cur *= b
        else:
            terms.append(cur)
            signs.append(op)
            cur = b
    terms.append(cur)
    return sum(t if s == "+" else -t for s, t in zip(signs, terms))


def _arithmetic(rng: random.Random, digits: int = 2, n_operands: int = 2, ops: str = "+-*") -> Problem:
    _check_range("digits", digits, 1, 9)
    _check_range("n_operands", n_operands, 2, 8)
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"ops must be a non-empty string over '+-*', got {ops!r}")
    lo = 0 if digits == 1 else 10 ** (digits - 1)  # operands have exactly `digits` digits
    operands = [rng.randint(lo, 10**digits - 1) for _ in range(n_operands)]
    opseq = [rng.choice(ops) for _ in range(n_operands - 1)]
    text = str(operands[0]) + "".join(op + str(b) for op, b in zip(opseq, operands[1:]))
    value = eval_chain(operands, opseq)
    return Problem(
        prompt=text + "=", answer=str(value), task="arithmetic", meta={"operands": operands, "ops": opseq}
    )


# ---------------------------------------------------------------------------------------------
# equations


def _equations(rng: random.Random, digits: int = 1, coef_digits: int = 1) -> Problem:
    _check_range("digits", digits, 1, 6)
    _check_range("coef_digits", coef_digits, 1, 4)
    top = 10**digits - 1
    a = rng.randint(2, max(2, 10**coef_digits - 1))
    x = rng.randint(-top, top)
    b = rng.choice((-1, 1)) * rng.randint(1, top)
    c = a * x + b
    sign = "+" if b > 0 else "-"
    return Problem(
        prompt=f"{a}*x{sign}{abs(b)}={c} x=",
        answer=str(x),
        task="equations",
        meta={"a": a, "b": b, "c": c, "x": x},
    )


# ---------------------------------------------------------------------------------------------
# countdown


def _combine(rng: random.Random, a: tuple[int, str], b: tuple[int, str], max_value: int):
    """One random exact integer step on two (value, expression) items, or None if none fits."""
    (va, ea), (vb, eb) = a, b
    choices = ["+", "*", "-", "/"]
    rng.shuffle(choices)
    for op in choices:
        if op == "-" and va < vb:
            (va, ea), (vb, eb) = (vb, eb), (va, ea)  # keep intermediate values positive
        if op == "+":
            v = va + vb
        elif op == "*":
            v = va * vb
        elif op == "-":
            v = va - vb
        else:
            if vb <= 1 or va % vb:
                continue  # exact division only, and /1 is a wasted step
            v = va // vb
        if 0 < v <= max_value:
            wrap = lambda e: e if e.isdigit() else f"({e})"  # noqa: E731
            return v, f"{wrap(ea)}{op}{wrap(eb)}", f"{va}{op}{vb}={v}"
    return None


def _countdown(
    rng: random.Random, n_numbers: int = 4, max_number: int = 20, max_target: int = 100
) -> Problem:
    _check_range("n_numbers", n_numbers, 2, 6)
    _check_range("max_number", max_number, 2, 1000)
    _check_range("max_target", max_target, 10, 10**6)
    for _ in range(1000):
        numbers = [rng.randint(1, max_number) for _ in range(n_numbers)]
        pool = [(v, str(v)) for v in numbers]
        steps: list[str] = []
        while len(pool) > 1:
            i, j = rng.sample(range(len(pool)), 2)
            step = _combine(rng, pool[i], pool[j], max_value=10 * max_target)
            if step is None:
                break
            pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [step[:2]]
            steps.append(step[2])
        target, expr = pool[0]
        if len(pool) == 1 and 1 <= target <= max_target and target not in numbers:
            prompt = f"reach {target} with {' '.join(map(str, numbers))}:"
            return Problem(
                prompt=prompt,
                answer=str(target),
                task="countdown",
                meta={"numbers": numbers, "target": target, "solution": expr, "steps": steps},
            )
    raise ValueError(
        f"no countdown problem found for n_numbers={n_numbers}, max_number={max_number}, "
        f"max_target={max_target}; raise max_target"
    )


class _Reject(Exception):
    pass


MAX_EXPR_CHARS = 256
_MAX_DEPTH = 32
_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def _eval_node(node: ast.AST, left: Counter, depth: int) -> Fraction:
    if depth > _MAX_DEPTH:
        raise _Reject("too deep")
    if isinstance(node, ast.Constant) and type(node.value) is int:
        if left[node.value] <= 0:
            raise _Reject(f"{node.value} not available")  # fail fast: never compute with foreign literals
        left[node.value] -= 1
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a = _eval_node(node.left, left, depth + 1)
        b = _eval_node(node.right, left, depth + 1)
        if isinstance(node.op, ast.Div) and b == 0:
            raise _Reject("division by zero")
        return _BINOPS[type(node.op)](a, b)
    raise _Reject(f"{type(node).__name__} not allowed")


def check_countdown(expr: str, numbers: list[int], target: int | str, use_all: bool = False) -> bool:
    """True iff `expr` uses only integers from `numbers` (each at most once, or exactly once with
    use_all), + - * / and parentheses, and evaluates exactly (rationals, no rounding) to `target`.

    Nothing is ever executed: the text is parsed with `ast` and walked; any other node (names,
    calls, attributes, **, unary minus, floats) rejects it.
    """
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        return False
    try:
        tree = ast.parse(expr.strip(), mode="eval")
        left = Counter(int(n) for n in numbers)
        value = _eval_node(tree.body, left, 0)
        goal = Fraction(int(target))
    except (_Reject, SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return False
    if use_all and sum(left.values()) != 0:
        return False
    return value == goal


# ---------------------------------------------------------------------------------------------
# registry

TASKS: dict[str, Callable[..., Problem]] = {
    "arithmetic": _arithmetic,
    "equations": _equations,
    "countdown": _countdown,
}


def difficulty_knobs(task: str) -> dict[str, object]:
    """The difficulty keyword arguments of a task and their defaults."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; built-in tasks: {', '.join(TASKS)}")
    params = list(inspect.signature(TASKS[task]).parameters.values())[1:]
    return {p.name: p.default for p in params}


def draw_problem(
    task: str,
    rng: random.Random,
    split: str = "train",
    test_fraction: float = 0.1,
    max_attempts: int = 10_000,
    **difficulty,
) -> Problem:
    """One problem of `task` from `split`, drawing from rng until the prompt hashes into it.

    A difficulty knob given as a list (`n_operands=[2, 3, 4]`) takes one of its values per problem."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    empty = [k for k, v in difficulty.items() if isinstance(v, (list, tuple)) and not v]
    if empty:
        raise ValueError(f"task {task!r}: difficulty knob(s) {empty} given as an empty list")
    bad = set(difficulty) - set(difficulty_knobs(task))
    if bad:
        raise ValueError(
            f"task {task!r} has no difficulty knob {sorted(bad)}; knobs: {difficulty_knobs(task)}"
        )
    for _ in range(max_attempts):
        # A knob given as a list is drawn per problem: one task set spanning several difficulties.
        knobs = {k: rng.choice(v) if isinstance(v, (list, tuple)) else v for k, v in difficulty.items()}
        p = TASKS[task](rng, **knobs)
        if split_of(p.prompt, test_fraction) == split:
            return p
    raise ValueError(
        f"no {split} problem of {task!r} in {max_attempts} draws (test_fraction={test_fraction})"
    )


def generate(
    task: str,
    n: int,
    seed: int,
    split: str = "train",
    test_fraction: float = 0.1,
    unique: bool = False,
    **difficulty,
) -> list[Problem]:
    """`n` problems of `task` from `split`, a pure function of its arguments.

    unique=True drops repeated prompts and raises if the settings cannot give n distinct ones.
    """
    rng = random.Random(f"{task}/{seed}")  # str seeds hash with SHA-512: stable across runs
    out: list[Problem] = []
    seen: set[str] = set()
    budget = 1000 + 50 * n
    while len(out) < n:
        p = draw_problem(task, rng, split, test_fraction, **difficulty)
        budget -= 1
        if unique and p.prompt in seen:
            if budget < 0:
                raise ValueError(
                    f"only {len(out)} distinct {split} problems of {task!r} with {difficulty}; "
                    f"asked for {n}: raise the difficulty or set unique=False"
                )
            continue
        seen.add(p.prompt)
        out.append(p)
    return out
