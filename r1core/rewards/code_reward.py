"""`code`: run the last ```python block after `</think>` against test cases in the sandbox.

Test-case forms accepted as `answer`:
- stdin/stdout tests: a list of `{"input": str, "output": str}`, the same list under
  `{"tests": [...]}`, or the APPS/TACO layout `{"inputs": [str, ...], "outputs": [str, ...]}`.
  Each test is a fresh run with `input` on stdin; stdout must equal `output` after stripping
  trailing whitespace from every line and dropping trailing blank lines.
- call tests: `{"fn_name": "f", "tests": [{"args": [...], "output": value}, ...]}` or
  `{"fn_name": "f", "inputs": [[args...], ...], "outputs": [value, ...]}`. The program defines
  `f` (or class `Solution` with method `f`, LeetCode style); one run calls it once per test and the
  return value must equal `output` after a JSON round trip (tuples compare as lists, sets as sorted
  lists). In this mode the limits apply to the whole run, not to each call.
Score: the fraction of tests passed (`mode="fraction"`, default) or 1.0 only when all pass
(`mode="all"`, which stops at the first failure). A program that fails with syntax_error,
timeout, network, process or forbidden is not run on the remaining tests: the outcome would not
change and a rollout worker's time matters more than partial credit for a slow program.
Reasons: passed, or the first failing test's reason (wrong, non_utf8, timeout, memory,
runtime_error, crash, syntax_error, output_limit, file_size, write_limit, network, process,
forbidden, no_function, sandbox_error); no_code, non_utf8 (the response), bad_tests (the dataset's
tests are malformed).

Isolation: the reward refuses to run (SandboxUnavailable, a RewardConfigError, raised on the first
call whatever the response) when this machine cannot give the sandbox every layer it asks for,
unless the limits say `allow_weak_isolation=True`; see sandbox.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from r1core.rewards.registry import RewardConfigError, register
from r1core.rewards.sandbox import SandboxLimits, check_isolation, run_python
from r1core.rewards.text import as_text, extract_code, split_think

_STOP_EARLY = frozenset(
    {"syntax_error", "timeout", "network", "process", "forbidden", "no_function", "sandbox_error"}
)


class BadTests(ValueError):
    pass


@dataclass
class CodeTests:
    fn_name: str | None
    cases: list[tuple[Any, Any]]  # (stdin str, stdout str) or (args list, return value)


def parse_tests(answer: Any) -> CodeTests:
    """Normalize the accepted `answer` forms (module doc); raises BadTests."""
    fn_name = None
    if isinstance(answer, dict):
        fn_name = answer.get("fn_name")
        if "tests" in answer:
            raw = answer["tests"]
        elif "inputs" in answer and "outputs" in answer:
            if len(answer["inputs"]) != len(answer["outputs"]):
                raise BadTests("inputs and outputs differ in length")
            key = "args" if fn_name else "input"
            raw = [{key: i, "output": o} for i, o in zip(answer["inputs"], answer["outputs"])]
        else:
            raise BadTests("a dict of tests needs 'tests' or 'inputs' and 'outputs'")
    else:
        raw = answer
    if not isinstance(raw, list) or not raw or not all(isinstance(t, dict) and "output" in t for t in raw):
        raise BadTests("tests must be a non-empty list of dicts with an 'output'")
    if fn_name is not None:
        if not isinstance(fn_name, str) or not all(isinstance(t.get("args"), list) for t in raw):
            raise BadTests("call tests need a str fn_name and an 'args' list per test")
        try:  # the arguments travel to the sandbox as JSON
            json.dumps([t["args"] for t in raw])
        except (TypeError, ValueError) as e:
            raise BadTests(f"call arguments are not JSON: {e}") from None
        return CodeTests(fn_name, [(t["args"], t["output"]) for t in raw])
    if not all(isinstance(t.get("input", ""), str) and isinstance(t["output"], str) for t in raw):
        raise BadTests("stdin tests need str 'input' and 'output'")
    return CodeTests(None, [(t.get("input", ""), t["output"]) for t in raw])


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _stdio_outcome(stdout: bytes, expected: str) -> str:
    try:
        got = stdout.decode("utf-8")
    except UnicodeDecodeError:
        return "non_utf8"
    return "passed" if _lines(got) == _lines(expected) else "wrong"


def _run_stdio(program: str, suite: CodeTests, limits: SandboxLimits, mode: str) -> list[str]:
    outcomes = []
    for stdin, expected in suite.cases:
        run = run_python(program, stdin.encode("utf-8"), limits)
        outcome = run.reason or _stdio_outcome(run.stdout, expected)
        outcomes.append(outcome)
        if outcome in _STOP_EARLY or (mode == "all" and outcome != "passed"):
            break
    return outcomes


def _run_calls(program: str, suite: CodeTests, limits: SandboxLimits) -> list[str]:
    run = run_python(program, b"", limits, fn_name=suite.fn_name, calls=[args for args, _ in suite.cases])
    results: dict[int, dict] = {}
    for line in run.stdout.splitlines():
        try:
            entry = json.loads(line)
            results[int(entry["i"])] = entry
        except (ValueError, KeyError, TypeError):
            continue  # the program wrote to fd 1 directly: that line is not a result
    outcomes = []
    for i, (_, expected) in enumerate(suite.cases):
        entry = results.get(i)
        if entry is None:
            outcomes.append(run.reason or "runtime_error")
        elif "error" in entry:
            outcomes.append("runtime_error")
        else:
            outcomes.append("passed" if entry.get("r") == json.loads(json.dumps(expected)) else "wrong")
    return outcomes


def _limits(limits: SandboxLimits | Mapping | None) -> SandboxLimits:
    if limits is None or isinstance(limits, SandboxLimits):
        return limits or SandboxLimits()
    if isinstance(limits, Mapping):
        try:
            return SandboxLimits(**limits)
        except (TypeError, ValueError) as e:
            raise RewardConfigError(f"code reward limits: {e}") from None
    raise RewardConfigError(f"limits must be SandboxLimits or a mapping, got {type(limits).__name__}")


@register("code", parallel=True)
def code_reward(
    response, answer, *, mode: str = "fraction", limits: SandboxLimits | Mapping | None = None
) -> tuple[float, str]:
    if mode not in ("fraction", "all"):
        raise RewardConfigError(f"code reward mode must be 'fraction' or 'all', got {mode!r}")
    limits = _limits(limits)
    check_isolation(limits)
    try:
        suite = parse_tests(answer)
    except BadTests:
        return 0.0, "bad_tests"
    text = as_text(response)
    if text is None:
        return 0.0, "non_utf8"
    final = split_think(text).final
    program = extract_code(final) if final is not None else None
    if program is None or not program.strip():
        return 0.0, "no_code"
    if suite.fn_name is None:
        outcomes = _run_stdio(program, suite, limits, mode)
    else:
        outcomes = _run_calls(program, suite, limits)
    passed = sum(o == "passed" for o in outcomes)
    failures = [o for o in outcomes if o != "passed"]
    score = passed / len(suite.cases) if mode == "fraction" else float(passed == len(suite.cases))
    return score, (failures[0] if failures else "passed")
