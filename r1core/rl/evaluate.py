"""Evaluation as the R1 paper reports it: pass@1 averaged over k samples, and cons@k majority vote.

pass@1 = mean over problems of (correct samples / k), sampled at temperature 0.6, top-p 0.95
(R1 §3), with its standard error and 95 % bootstrap interval over problems (r1core.rl.stats);
pass@j for j = 2, 4, ... up to k (the unbiased estimator); cons@k = share of problems whose most
common final answer is correct; direct_share is the share of samples that answer at once (an empty
think block). Greedy accuracy is reported beside them. The answer must be boxed
after `</think>` (R1's rule) unless `require_boxed=false`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from r1core.data.tasks import Problem
from r1core.rewards.text import TooComplex, extract_answer, split_think
from r1core.rollout.types import SamplingConfig, SamplingParams

from .rewarding import Scorer
from .stats import bootstrap_mean, pass_at_k_curve


@dataclass(kw_only=True)
class EvalConfig:
    problems: int = 200  # held-out problems (the first N of the eval set)
    k: int = 4  # samples per problem (pass@1 averages them; pass@2..k, cons@k)
    # R1's evaluation sampling: temperature 0.6, top-p 0.95
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.6, top_p=0.95, max_new_tokens=64)
    )
    greedy: bool = True  # also report greedy accuracy (one more pass)


def final_answer(response: str) -> str | None:
    """The answer a response commits to (for voting): the extracted answer after </think>, whitespace-free."""
    final = split_think(response).final
    if final is None:
        return None
    try:
        ans, _ = extract_answer(final)
    except TooComplex:
        return None
    return None if ans is None else "".join(ans.split())


def majority_correct(answers: Sequence[str | None], correct: Sequence[float]) -> float:
    """cons@k for one problem: is the most frequent non-empty answer correct? (ties: first seen)"""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    best = max(votes.items(), key=lambda kv: (kv[1], -answers.index(kv[0])))[0]
    return float(correct[answers.index(best)])


def evaluate(
    rollout,
    render: Callable[[Problem], list[int]],
    problems: Sequence[Problem],
    cfg: EvalConfig,
    seed: int = 0,
    stop: list[str] | None = None,
    require_boxed: bool = True,
) -> tuple[dict, list[dict]]:
    """(metrics, per-problem rows). Deterministic for a given seed. `require_boxed`: R1's answer rule
    (the pipeline passes the job's `require_boxed`)."""
    scorer = Scorer({"accuracy": 1.0}, require_boxed=require_boxed)
    prompts = [render(p) for p in problems]
    k = cfg.k
    samples = rollout.generate(prompts, k, cfg.sampling.params(stop=stop or [], seed=seed))
    rows, pass1, cons, lengths, direct = [], 0.0, 0.0, [], 0
    for i, p in enumerate(problems):
        group = samples[i * k : (i + 1) * k]
        correct = [scorer.score(s.response_text, p)[1]["accuracy"] for s in group]
        answers = [final_answer(s.response_text) for s in group]
        c = majority_correct(answers, correct)
        pass1 += sum(correct) / k
        cons += c
        lengths += [len(s.response_ids) for s in group]
        direct += sum(_empty_think(s.response_text) for s in group)
        # pass@k needs solved / not solved: a partial score (a code reward's share of tests) is not solved
        solved = sum(1 for a in correct if a >= 1.0)
        rows.append(
            {
                "prompt": p.prompt,
                "answer": p.answer,
                "correct": solved,
                "pass1": sum(correct) / k,
                "cons": c,
                "sample": group[0].response_text,
            }
        )
    n = max(len(problems), 1)
    metrics = {
        "pass@1": pass1 / n,
        f"cons@{k}": cons / n,
        "response_len": sum(lengths) / max(len(lengths), 1),
        "direct_share": direct / max(len(lengths), 1),
        "problems": len(problems),
        "k": k,
    }
    if rows:
        est = bootstrap_mean([r["pass1"] for r in rows], seed=seed)
        metrics.update({"pass@1_se": est.se, "pass@1_lo": est.lo, "pass@1_hi": est.hi})
        curve = pass_at_k_curve([r["correct"] for r in rows], k)
        metrics.update({f"pass@{j}": curve[j] for j in _powers_of_two(k) if j > 1})
    if cfg.greedy:
        greedy = SamplingParams(temperature=0.0, max_new_tokens=cfg.sampling.max_new_tokens, stop=stop or [])
        greedy = rollout.generate(prompts, 1, greedy)
        acc = [scorer.score(s.response_text, p)[1]["accuracy"] for s, p in zip(greedy, problems)]
        metrics["greedy"] = sum(acc) / n
        for row, a in zip(rows, acc):
            row["greedy"] = a
    return metrics, rows


def _empty_think(response: str) -> bool:
    """The sample answered at once: its think block (opened by the prompt) closes with nothing in it."""
    reasoning = split_think(response).reasoning
    return reasoning is not None and not reasoning.strip()


def _powers_of_two(k: int) -> list[int]:
    """1, 2, 4, ... up to k, and k itself."""
    out = [1]
    while out[-1] * 2 <= k:
        out.append(out[-1] * 2)
    return out if out[-1] == k else out + [k]
