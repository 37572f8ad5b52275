"""What every stage is handed (`StageContext`) and the pieces several stages build from it: the
training engine, the rollout engine and the prompt renderer.

stages.py, rejection.py and all_scenario.py import these from here; this module imports none of
them, so the stage modules never import one another in a circle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from r1core.data import ChatFormat, Problem, Tokenizer

from .config import JobConfig, StageKind, StageSpec


@dataclass
class StageContext:
    spec: StageSpec
    job: JobConfig
    stage_dir: Path
    init_model: str | None  # HF directory to start from (None: fresh weights)
    dataset: str | None  # a dataset produced by an earlier stage
    prepared: dict  # the prepare stage's outputs
    device: torch.device
    dtype: torch.dtype
    is_main: bool = True
    student_init: str | None = None  # distill: HF directory the student starts from (None: fresh weights)

    @property
    def model_dir(self) -> Path:
        return self.stage_dir / "model"

    def tokenizer(self) -> tuple[Tokenizer, ChatFormat]:
        tok = Tokenizer.from_file(self.prepared["tokenizer"])
        return tok, ChatFormat.for_tokenizer(tok)


def make_engine(
    ctx: StageContext, steps: int, lr: float, model_args=None, init: bool = True, start: str | None = None
):
    """An engine for this stage: the job's optimizer settings with the stage's own peak LR and length,
    started from the stage's `init_model` weights (fresh optimizer state) unless `init` is False, or from
    the HF directory `start` (the distillation student's base)."""
    from r1core.train.engine import build_engine

    args = model_args or ctx.job.model
    if init and ctx.init_model and ctx.spec.kind != StageKind.long_context:
        from .long_context import (
            rope_of,
        )  # the starting model's context, which a long_context stage may have extended

        args = args.replace(**rope_of(ctx.init_model))
    optim = dataclasses.replace(ctx.job.optim, lr=lr, total_steps=max(steps, 1))
    engine = build_engine(
        args, ctx.job.parallel, optim, device=ctx.device, dtype=ctx.dtype, seed=ctx.job.seed
    )
    if start or (init and ctx.init_model):
        engine.load_hf(start or ctx.init_model)
    return engine


def make_rollout(ctx: StageContext, engine_or_model, tok: Tokenizer, max_len: int, max_batch: int = 256):
    """The configured rollout engine (`rollout.engine`) serving this stage's model."""
    from r1core.rollout.config import build_rollout

    model = getattr(engine_or_model, "model", engine_or_model)
    return build_rollout(ctx.job.rollout, model, tok, max_len=max_len, max_batch=max_batch)


def prompt_renderer(tok: Tokenizer, fmt: ChatFormat) -> Callable[[Problem], list[int]]:
    """problem -> prompt token ids in the chat format, exactly as the model sees it when sampling."""
    return lambda problem: tok.encode(fmt.render_prompt(problem.prompt))


def rollout_len(
    render: Callable[[Problem], list[int]], problems: Sequence[Problem], max_new_tokens: int
) -> int:
    """The sequence length a rollout engine needs for these prompts and responses (8 tokens of slack)."""
    return max(len(render(p)) for p in problems) + max_new_tokens + 8
