"""`math_accuracy`: 1.0 when the final answer after `</think>` equals the gold answer (math-verify).

The answer is read from the text after the last `</think>` only (a response whose think block never
closes has none). With `require_boxed=True` (R1's rule, the default of the RL stages, rejection
sampling and evaluation) only the last `\\boxed{}` there counts: a box inside the think block,
"the answer is X", `<answer>` tags or a bare number score 0 ("no_boxed"). The lenient default of
this function takes the last `\\boxed{}`, else `<answer>...</answer>`, else "the answer is X", else
the last number (text.extract_answer). math-verify then decides equality: symbolic, numeric (to 6
decimals), LaTeX, sets, intervals, equations (`x=3` matches `3`), thousands separators.

Where the check runs (`isolation`):
- "inline": in this process, bounded by math-verify's own `signal.alarm` timeouts (whole seconds;
  any SIGALRM timer the caller had set is cancelled). Only possible on the main thread; it is the
  cheap path (no IPC) for rollout workers that score in their main loop.
- "process": in a long-lived helper interpreter (`_math_worker.py`) under an address-space limit,
  with a hard deadline in this process on top of math-verify's timeouts: the worker is killed and
  restarted when even those fail (C code that ignores signals). Works from any thread; one worker
  per process, so concurrent threads take turns. Its first use costs about a second of startup.
- "auto" (default): inline on the main thread, process elsewhere.
Before either, the answer is capped in length and brace depth, so a pathological output is rejected
in linear time without reaching sympy at all.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction

from r1core.rewards import mathcheck
from r1core.rewards.registry import RewardConfigError, register
from r1core.rewards.text import TooComplex, as_text, extract_answer, last_boxed, split_think

_WORKER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_math_worker.py")


class _MathWorker:
    """One helper interpreter; requests are serialized by a lock."""

    def __init__(self, memory_mb: int = 4096, startup_s: float = 120.0) -> None:
        self.memory_mb, self.startup_s = memory_mb, startup_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._buf = b""

    def _readline(self, deadline: float) -> bytes | None:
        """One line from the worker before `deadline`; None on timeout or EOF."""
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def _start(self) -> None:
        self._buf = b""
        self._proc = subprocess.Popen(
            [sys.executable, "-I", _WORKER_PATH, str(self.memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        if self._readline(time.monotonic() + self.startup_s) != b"ready":
            self.close()
            raise RuntimeError("math-verify worker did not start")

    def forget(self) -> None:
        """In a forked child: the worker belongs to the parent; start a fresh one on demand."""
        self._lock, self._proc, self._buf = threading.Lock(), None, b""

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def check(self, pred: str, gold: str, timeout_s: int) -> str:
        # Gold parse, prediction parse and a few comparisons each get timeout_s inside the worker.
        hard_s = 4 * timeout_s + 2
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            request = json.dumps({"pred": pred, "gold": gold, "timeout_s": timeout_s}) + "\n"
            try:
                self._proc.stdin.write(request.encode())
            except BrokenPipeError:  # died since the poll above (killed by its memory limit)
                self.close()
                return "memory"
            line = self._readline(time.monotonic() + hard_s)
            if line is None:
                died = self._proc.poll() is not None
                self.close()
                return "memory" if died else "timeout"
            return json.loads(line)["reason"]


_WORKER = _MathWorker()
atexit.register(_WORKER.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WORKER.forget)


def _run_check(pred: str, gold: str, timeout_s: int, isolation: str) -> str:
    on_main = threading.current_thread() is threading.main_thread()
    if isolation == "inline" and not on_main:
        raise RewardConfigError("isolation='inline' needs the main thread (math-verify uses signal.alarm)")
    if isolation == "inline" or (isolation == "auto" and on_main):
        return mathcheck.check(pred, gold, timeout_s)
    return _WORKER.check(pred, gold, timeout_s)


def _nesting(s: str) -> int:
    depth = deepest = 0
    for c in s:
        if c in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "})]":
            depth = max(0, depth - 1)
    return deepest


def gold_text(answer) -> str:
    """Gold answers come as numbers, fractions or LaTeX strings (possibly boxed or in `$...$`)."""
    if isinstance(answer, Fraction):
        return f"{answer.numerator}/{answer.denominator}"
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return repr(answer)
    if not isinstance(answer, str):
        raise RewardConfigError(
            f"math gold answer must be str, int, float or Fraction, got {type(answer).__name__}"
        )
    boxed = last_boxed(answer, max_chars=len(answer) + 1, max_depth=len(answer) + 1)
    return (boxed if boxed is not None else answer).strip().strip("$").strip()


@register("math_accuracy")
def math_accuracy(
    response,
    answer,
    *,
    timeout_s: int = 3,
    isolation: str = "auto",
    max_answer_chars: int = 1000,
    max_depth: int = 32,
    require_boxed: bool = False,
) -> tuple[float, str]:
    """Reasons: correct, wrong, no_answer, no_boxed (require_boxed: no box after </think>), non_utf8,
    too_complex, parse_error, timeout, memory, bad_gold (the dataset's answer does not parse: fix the
    data)."""
    if isolation not in ("auto", "inline", "process"):
        raise RewardConfigError(f"isolation must be auto, inline or process, got {isolation!r}")
    if not isinstance(timeout_s, int) or timeout_s < 1:
        raise RewardConfigError("timeout_s must be a positive int (math-verify uses signal.alarm)")
    gold = gold_text(answer)
    text = as_text(response)
    if text is None:
        return 0.0, "non_utf8"
    final = split_think(text).final
    if require_boxed and "</think>" not in text:
        return 0.0, "no_boxed"  # R1's rule: the answer follows a closed think block
    if final is None:
        return 0.0, "no_answer"
    try:
        pred, how = extract_answer(final, max_answer_chars, max_depth)
    except TooComplex:
        return 0.0, "too_complex"
    if require_boxed and how != "boxed":
        return 0.0, "no_boxed"
    if not pred:
        return 0.0, "no_answer"
    if len(pred) > max_answer_chars or _nesting(pred) > max_depth:
        return 0.0, "too_complex"
    reason = _run_check(pred, gold, timeout_s, isolation)
    return (1.0 if reason == mathcheck.CORRECT else 0.0), reason
