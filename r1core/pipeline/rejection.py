"""Rejection sampling (R1 §2.3.3) and teacher sampling for distillation (§2.4).

k samples per prompt from a checkpoint; a sample is kept when it is correct, well formatted,
single-language, finished (not truncated) and free of repetition loops; kept responses are
deduplicated per prompt, mixed with non-reasoning SFT data at a configured ratio and written as
JSONL with provenance (model, stage, seed, prompt and sample index, reward values).
"""

from __future__ import annotations

import json
import random
from collections import Counter

from r1core import rewards
from r1core.data import SFTExample, load_sft_jsonl
from r1core.parallel.comm import run_on_rank0
from r1core.rl.rewarding import Scorer
from r1core.rollout import SamplingParams
from r1core.train.checkpointing import atomic_write_text

from .config import Filters
from .context import StageContext, make_rollout, prompt_renderer, rollout_len
from .prepare import read_problems


def max_ngram_repeats(ids: list[int], n: int = 4) -> int:
    """How often the most frequent n-gram occurs: a loop shows up as a large count."""
    if len(ids) < n:
        return 0
    return max(Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)).values())


def rejection_reason(
    sample, problem, full_response: str, scorer: Scorer, f: Filters
) -> tuple[str | None, dict]:
    """None when the sample is kept, else the first failed check; plus the reward values."""
    _, values = scorer.score(sample.response_text, problem)
    if f.require_finished and sample.finish_reason != "stop":
        return "truncated", values
    if f.require_correct and values["accuracy"] < 1:
        return "incorrect", values
    if f.require_format and rewards.get("format")(full_response, None) < 1:
        return "format", values
    if f.min_language_share > 0:
        share, why = rewards.get("language_consistency").scored(full_response, None, lang=f.language)
        values["language_consistency"] = share
        if why != "no_words" and share < f.min_language_share:  # pure math reasoning has no words to judge
            return "language_mixing", values
    if f.max_ngram_repeats and max_ngram_repeats(sample.response_ids) > f.max_ngram_repeats:
        return "repetition", values
    return None, values


def sample_and_filter(
    ctx: StageContext, model_dir: str, problems, k: int, sampling: SamplingParams, filters: Filters
):
    """(kept rows with provenance, stats) from k samples per problem of the model in `model_dir`."""
    from r1core.checkpoint.hf import from_pretrained

    tok, fmt = ctx.tokenizer()
    model = from_pretrained(model_dir, dtype=ctx.dtype, device=ctx.device)
    render = prompt_renderer(tok, fmt)
    rollout = make_rollout(ctx, model, tok, max_len=rollout_len(render, problems, sampling.max_new_tokens))
    samples = rollout.generate([render(p) for p in problems], k, sampling)
    scorer = Scorer({"accuracy": 1.0}, require_boxed=ctx.job.require_boxed)
    reasons: Counter = Counter()
    rows, seen = [], set()
    for s in samples:
        problem = problems[s.prompt_index]
        full = fmt.full_response(s.response_text)
        why, values = rejection_reason(s, problem, full, scorer, filters)
        if why is None and filters.dedupe and (problem.prompt, s.response_text.strip()) in seen:
            why = "duplicate"
        reasons[why or "kept"] += 1
        if why is None:
            seen.add((problem.prompt, s.response_text.strip()))
            rows.append(
                {
                    "prompt": problem.prompt,
                    "response": full,
                    "source": ctx.spec.name,
                    "provenance": {
                        "model": model_dir,
                        "stage": ctx.spec.name,
                        "seed": sampling.seed,
                        "prompt_index": s.prompt_index,
                        "sample_index": s.sample_index,
                        "task": problem.task,
                        "rewards": values,
                    },
                }
            )
    stats = {
        "generated": len(samples),
        "kept": len(rows),
        **{f"rejected/{k_}": v for k_, v in reasons.items() if k_ != "kept"},
    }
    return rows, stats


def run_rejection_sampling(ctx: StageContext):
    cfg = ctx.job.rejection
    problems = read_problems(ctx.prepared["rl_prompts"])
    problems = random.Random(ctx.job.seed + 11).sample(problems, min(cfg.prompts, len(problems)))
    sampling = cfg.sampling.params(seed=ctx.job.seed + 12)
    rows, stats = sample_and_filter(
        ctx, ctx.init_model, problems, cfg.samples_per_prompt, sampling, cfg.filters
    )
    if not rows:
        raise RuntimeError(
            f"rejection sampling kept no sample ({stats}): the model is too weak for the filters"
        )
    extra = []
    if cfg.non_reasoning_ratio > 0:
        pool = load_sft_jsonl(ctx.prepared["non_reasoning"])
        n = round(len(rows) * cfg.non_reasoning_ratio / (1 - cfg.non_reasoning_ratio))
        rng = random.Random(ctx.job.seed + 13)
        extra = [
            {
                "prompt": e.prompt,
                "response": e.response,
                "source": "non_reasoning",
                "provenance": {"file": ctx.prepared["non_reasoning"]},
            }
            for e in (rng.choice(pool) for _ in range(n))
        ]
    dataset = rows + extra
    random.Random(ctx.job.seed + 14).shuffle(dataset)
    path = ctx.stage_dir / "dataset.jsonl"
    if ctx.is_main:
        atomic_write_text(path, "\n".join(json.dumps(r) for r in dataset) + "\n")
    return {"dataset": str(path)}, {**stats, "non_reasoning": len(extra), "written": len(dataset)}


def teacher_dataset(ctx: StageContext) -> tuple[list[SFTExample], dict]:
    """Distillation data: the teacher's filtered samples on RL prompts (R1 distills from its 800k samples)."""
    cfg = ctx.job.distill
    problems = read_problems(ctx.prepared["rl_prompts"])
    problems = random.Random(ctx.job.seed + 21).sample(problems, min(cfg.prompts, len(problems)))
    sampling = cfg.sampling.params(seed=ctx.job.seed + 22)
    # under torchrun rank 0 samples and the student's ranks get its rows
    rows, stats = run_on_rank0(
        sample_and_filter, ctx, ctx.init_model, problems, cfg.samples_per_prompt, sampling, cfg.filters
    )
    if not rows:
        raise RuntimeError(f"the teacher produced no usable sample for distillation ({stats})")
    if ctx.is_main:
        atomic_write_text(
            ctx.stage_dir / "teacher_samples.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n"
        )
    return [SFTExample(r["prompt"], r["response"]) for r in rows], {
        f"teacher/{k}": v for k, v in stats.items()
    }
