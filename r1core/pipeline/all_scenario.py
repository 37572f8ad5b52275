"""All-scenario RL (R1 §2.3.4): reasoning prompts keep their rule rewards, general prompts are judged by
the reward model installed through `r1core.rewards.set_reward_model`.

The reward model: `rl.reward_model_path` points at a scalar-head checkpoint (an r1core HF directory
plus `value_head.safetensors`, see `TransformerRewardModel`). Without one, the built-in general prompts
are judged by `ReferenceOverlapJudge`, a programmatic stand-in that scores token overlap with a
reference answer; it exercises the same hook and is reported as such in the run report.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import torch

from r1core import rewards
from r1core.data import Problem
from r1core.rl.rewarding import Scorer

GENERAL_TASK = "general"


def all_scenario_problems(
    reasoning: list[Problem], general_path: str, seed: int, general_share: float = 0.25
):
    """Reasoning problems interleaved with general prompts at `general_share`."""
    general = []
    with open(general_path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                general.append(
                    Problem(
                        prompt=r["prompt"],
                        answer=r.get("answer", ""),
                        task=GENERAL_TASK,
                        meta={"reference": r.get("reference", "")},
                    )
                )
    if not general:
        return reasoning
    n_general = max(1, int(len(reasoning) * general_share / (1 - general_share)))
    rng = random.Random(seed)
    mixed = reasoning + [general[i % len(general)] for i in range(n_general)]
    rng.shuffle(mixed)
    return mixed


class AllScenarioScorer(Scorer):
    """Rule rewards for reasoning problems; the reward model (weight rl.reward_model_weight) for general
    ones."""

    def __init__(self, weights, reward_kwargs, rm_weight: float, require_boxed: bool = True):
        super().__init__(weights, reward_kwargs, require_boxed=require_boxed)
        self.rm_weight = rm_weight

    def score(self, response: str, problem: Problem):
        if problem.task != GENERAL_TASK:
            total, values = super().score(response, problem)
            return total, {**values, "reward_model": float("nan")}
        value = rewards.get("reward_model")(response, None, prompt=problem.prompt)
        values = {name: float("nan") for name in set(self.weights) | {"accuracy"}}
        values["reward_model"] = value
        return self.rm_weight * value, values


def all_scenario_scorer(cfg, require_boxed: bool, device="cpu") -> AllScenarioScorer:
    """The scorer for `cfg` (the job's `rl` section), with its reward model installed."""
    if cfg.reward_model_path:
        rewards.set_reward_model(TransformerRewardModel(cfg.reward_model_path, device=device))
    else:
        rewards.set_reward_model(ReferenceOverlapJudge.builtin(), transform="clip")
    return AllScenarioScorer(cfg.rewards, cfg.reward_kwargs, cfg.reward_model_weight, require_boxed)


class ReferenceOverlapJudge:
    """Token-F1 between the answer (after </think>) and a reference answer for the prompt, in [0, 1]."""

    def __init__(self, references: dict[str, str]):
        self.references = references

    @classmethod
    def builtin(cls) -> "ReferenceOverlapJudge":
        from .prepare import GENERAL_PROMPTS
        from r1core.data import builtin_paragraphs

        refs: dict[str, list[str]] = {}
        for i, para in enumerate(builtin_paragraphs()):
            refs.setdefault(GENERAL_PROMPTS[i % len(GENERAL_PROMPTS)], []).append(para.split(". ")[0])
        return cls({k: " ".join(v) for k, v in refs.items()})

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for p, r in zip(prompts, responses):
            answer = r.split("</think>")[-1].lower().split()
            ref = self.references.get(p, "").lower().split()
            common = sum((Counter(answer) & Counter(ref)).values())
            if not answer or not ref or not common:
                out.append(0.0)
                continue
            prec, rec = common / len(answer), common / len(ref)
            out.append(2 * prec * rec / (prec + rec))
        return out


class TransformerRewardModel(rewards.ScalarHeadRewardModel):
    """A scalar-head reward model: an r1core Transformer trunk, a linear value head on the last token's
    final hidden state (the Bradley-Terry reward model R1's general-data stage uses), scoring
    prompt + response truncated to its last `max_tokens` tokens."""

    def __init__(self, path: str | Path, device="cpu", dtype=torch.float32, max_tokens: int = 2048):
        from safetensors.torch import load_file

        from r1core.checkpoint.hf import from_pretrained
        from r1core.data import Tokenizer

        path = Path(path)
        self.model = from_pretrained(path, dtype=dtype, device=device).eval()
        self.value_head = load_file(str(path / "value_head.safetensors"))["weight"].to(device, dtype)  # [D]
        self.tok = Tokenizer.from_file(path / "tokenizer.json")
        super().__init__(self.tok.encode, self.value, max_tokens=max_tokens)

    @torch.no_grad()
    def value(self, ids: list[int]) -> float:
        h, _ = self.model.hidden_states(torch.tensor([ids], device=self.value_head.device))
        return float(h[0, -1] @ self.value_head)
