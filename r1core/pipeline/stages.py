"""Stage implementations. Each takes a StageContext and returns (outputs, metrics) for the manifest.

A model stage writes its final weights as an HF DeepSeek-V3 directory (`<stage>/model`), the
only thing the next stage reads; its own checkpoints (`<stage>/checkpoints`) make it resumable.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import shutil
from pathlib import Path

from r1core.data import PackedSFTDataset, TokenShardDataset, load_sft_jsonl, tokenize_sft
from r1core.train.checkpointing import atomic_write_json, atomic_write_text

from .config import StageKind
from .context import StageContext, make_engine, make_rollout, prompt_renderer, rollout_len
from .prepare import read_problems, run_prepare

log = logging.getLogger(__name__)


def _export(ctx: StageContext, engine) -> dict:
    engine.export_hf(ctx.model_dir)
    if ctx.is_main:  # the next stage finds the tokenizer beside the weights, as in released checkpoints
        shutil.copy(ctx.prepared["tokenizer"], ctx.model_dir / "tokenizer.json")
    return {"model": str(ctx.model_dir)}


# ---------------------------------------------------------------------------- stages


def stage_prepare(ctx: StageContext):
    skipped: dict[str, int] = {}
    outputs = run_prepare(ctx.job, ctx.stage_dir, skipped)
    return outputs, {f"skipped_lines/{key}": n for key, n in skipped.items() if n}


def stage_load(ctx: StageContext):
    """Start from an HF checkpoint directory: validated here (config, index, every shard's header, every
    tensor's name, shape and dtype) so a damaged checkpoint fails in this stage, naming the file."""
    import warnings

    from r1core.checkpoint.hf import check_pretrained

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_pretrained(ctx.job.hf_checkpoint, ctx.job.model)
    for w in caught:
        log.warning("%s", w.message)
    return {"model": str(Path(ctx.job.hf_checkpoint).resolve())}, {}


def stage_pretrain(ctx: StageContext):
    """Next-token training on the prepared shards. A long_context stage is the same at its own length,
    under its YaRN settings, its passkey documents of every length up to its own (see long_context.py)."""
    from r1core.data.passkey import PasskeyMix
    from r1core.train.lm import WindowBatches, train_lm
    from r1core.train.objectives import LMObjective

    from .long_context import rope_summary

    long = ctx.spec.kind == StageKind.long_context
    cfg = ctx.job.long_context if long else ctx.job.pretrain
    tok, _ = ctx.tokenizer()
    engine = make_engine(ctx, cfg.steps, cfg.lr)
    ds = TokenShardDataset(
        ctx.prepared["shards"],
        cfg.seq_len,
        seed=ctx.job.seed,
        dp_rank=engine.dp_rank,
        dp_size=engine.dp_size,
        tokenizer_hash=tok.hash,
    )
    data = WindowBatches(ds, cfg.micro_batch_size // engine.dp_size or 1, cfg.doc_masking)
    if ctx.job.data.passkey_fraction:
        data = PasskeyMix(data, tok, ctx.job.data.passkey_fraction, seed=ctx.job.seed + engine.dp_rank)
    val = _val_batches(ctx, cfg, engine, tok) if cfg.eval_every else None
    metrics = train_lm(
        engine,
        data,
        cfg,
        ctx.stage_dir,
        LMObjective(),
        desc=ctx.spec.name,
        is_main=ctx.is_main,
        val_batches=val,
    )
    return _export(ctx, engine), {
        **_keep(metrics, "loss", "ce", "val_ce", "mtp", "tokens_per_s"),
        **rope_summary(engine.model.args),
        "seq_len": cfg.seq_len,
    }


def _val_batches(ctx: StageContext, cfg, engine, tok) -> list[dict] | None:
    """This rank's held-out micro-batches: the first `cfg.eval_batches` of the validation shards' windows
    in file order (the same every evaluation); None when prepare wrote none."""
    from r1core.train.lm import WindowBatches

    path = ctx.prepared.get("val_shards")
    if not path:
        return None
    try:
        ds = TokenShardDataset(
            path, cfg.seq_len, dp_rank=engine.dp_rank, dp_size=engine.dp_size, shuffle=False, loop=False,
            tokenizer_hash=tok.hash,
        )  # fmt: skip
    except ValueError as err:  # too few held-out tokens for this length: train on, without validation
        log.warning(
            "stage %s: no validation loss: %s (raise data.val_docs or add data.val_files)", ctx.spec.name, err
        )
        return None
    mbs = min(cfg.micro_batch_size // engine.dp_size or 1, len(ds))
    val = list(itertools.islice(WindowBatches(ds, mbs, cfg.doc_masking), cfg.eval_batches))
    if len(val) < cfg.eval_batches:
        what = "stage %s: validation on %d micro-batches (eval_batches=%d: the held-out data holds no more)"
        log.info(what, ctx.spec.name, len(val), cfg.eval_batches)
    return val


def _sft_data(ctx: StageContext, cfg, examples, tok, fmt, engine):
    from r1core.train.lm import SFTBatches

    docs = tokenize_sft(examples, tok, fmt, max_len=cfg.seq_len)
    ds = PackedSFTDataset(
        docs, cfg.seq_len, tok.pad_id, seed=ctx.job.seed, dp_rank=engine.dp_rank, dp_size=engine.dp_size
    )
    return SFTBatches(ds, max(cfg.micro_batch_size // engine.dp_size, 1))


def _run_sft(ctx: StageContext, cfg, examples, model_args=None, init=True, start=None):
    from r1core.train.lm import train_lm
    from r1core.train.objectives import LMObjective

    tok, fmt = ctx.tokenizer()
    engine = make_engine(ctx, cfg.steps, cfg.lr, model_args, init, start)
    data = _sft_data(ctx, cfg, examples, tok, fmt, engine)
    metrics = train_lm(
        engine, data, cfg, ctx.stage_dir, LMObjective(), desc=ctx.spec.name, is_main=ctx.is_main
    )
    return engine, _keep(metrics, "loss", "ce", "tokens_per_s")


def stage_sft(ctx: StageContext):
    default = ctx.prepared["cold_start"] if ctx.spec.kind == StageKind.cold_start_sft else None
    path = ctx.dataset or default
    if path is None:
        raise ValueError(f"stage {ctx.spec.name!r}: no dataset (set dataset=<stage> in the pipeline)")
    examples = load_sft_jsonl(path)
    engine, metrics = _run_sft(ctx, ctx.job.sft, examples)
    return _export(ctx, engine), {**metrics, "examples": len(examples)}


def stage_rl(ctx: StageContext):
    from r1core.rl.evaluate import evaluate
    from r1core.rl.rewarding import Scorer
    from r1core.rl.trainer import GRPOTrainer

    cfg = ctx.job.rl
    tok, fmt = ctx.tokenizer()
    engine = make_engine(ctx, cfg.steps * cfg.minibatches, cfg.lr)
    ref = None
    if cfg.loss.beta > 0:
        ref = make_engine(ctx, 1, cfg.lr)  # frozen: forward passes only, never stepped
    problems = read_problems(ctx.prepared["rl_prompts"])
    boxed = ctx.job.require_boxed
    if ctx.spec.kind == StageKind.all_scenario_rl:
        from .all_scenario import all_scenario_problems, all_scenario_scorer

        problems = all_scenario_problems(problems, ctx.prepared["general_prompts"], ctx.job.seed)
        scorer = all_scenario_scorer(cfg, boxed)
    else:
        scorer = Scorer(cfg.rewards, cfg.reward_kwargs, require_boxed=boxed)
    render = prompt_renderer(tok, fmt)
    max_len = rollout_len(render, problems[:1000], cfg.sampling.max_new_tokens)
    if engine.world_size > 1:  # rank 0 generates with a whole-model copy refreshed from the shards
        from r1core.rollout.gathered import GatheredRollout

        rollout = GatheredRollout(
            engine,
            ctx.job.model,
            lambda m: make_rollout(ctx, m, tok, max_len),
            device=ctx.device,
            dtype=ctx.dtype,
        )
    else:
        rollout = make_rollout(ctx, engine, tok, max_len=max_len)
    eval_set = read_problems(ctx.prepared["eval"])[: ctx.job.eval.problems]

    def eval_fn(step):
        return evaluate(rollout, render, eval_set, ctx.job.eval, seed=ctx.job.seed, require_boxed=boxed)[0]

    trainer = GRPOTrainer(
        cfg,
        engine,
        rollout,
        render,
        problems,
        ctx.stage_dir,
        ref_engine=ref,
        pad_id=tok.pad_id,
        seed=ctx.job.seed,
        scorer=scorer,
        eval_fn=eval_fn,
        is_main=ctx.is_main,
    )
    metrics = trainer.run()
    return _export(ctx, engine), _keep(
        metrics,
        "reward",
        "reward/accuracy",
        "reward/format",
        "response_len",
        "kl",
        "entropy",
        "rollout_tok_s",
        "train_tok_s",
    )


def stage_eval(ctx: StageContext):
    from r1core.checkpoint.hf import from_pretrained
    from r1core.rl.evaluate import evaluate

    if ctx.init_model is None:
        raise ValueError(f"stage {ctx.spec.name!r}: nothing to evaluate (no earlier model stage)")
    tok, fmt = ctx.tokenizer()
    model = from_pretrained(ctx.init_model, dtype=ctx.dtype, device=ctx.device)
    problems = read_problems(ctx.prepared["eval"])[: ctx.job.eval.problems]
    render = prompt_renderer(tok, fmt)
    max_len = rollout_len(render, problems, ctx.job.eval.sampling.max_new_tokens)
    rollout = make_rollout(ctx, model, tok, max_len=max_len)
    metrics, rows = evaluate(
        rollout, render, problems, ctx.job.eval, seed=ctx.job.seed, require_boxed=ctx.job.require_boxed
    )
    metrics["model"] = ctx.init_model
    if ctx.is_main:  # per-problem counts let the report compare models problem by problem
        atomic_write_text(ctx.stage_dir / "samples.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
        atomic_write_json(
            ctx.stage_dir / "eval.json",
            {
                **metrics,
                "per_problem_correct": [r["correct"] for r in rows],
                "per_problem_pass1": [r["pass1"] for r in rows],
            },
        )
    return {"eval": str(ctx.stage_dir / "eval.json")}, metrics


def stage_passkey_eval(ctx: StageContext):
    from .long_context import stage_passkey_eval as run

    return run(ctx)


def stage_rejection_sampling(ctx: StageContext):
    from .rejection import run_rejection_sampling

    return run_rejection_sampling(ctx)


def stage_distill(ctx: StageContext):
    from .rejection import teacher_dataset

    cfg = ctx.job.distill
    student = dataclasses.replace(cfg.student, vocab_size=ctx.job.model.vocab_size)
    if ctx.student_init:  # before the teacher samples: a wrong base names its file and the fields that differ
        from r1core.checkpoint.hf import check_pretrained

        check_pretrained(ctx.student_init, student)
        log.info("stage %s: the student starts from %s", ctx.spec.name, ctx.student_init)
    examples, stats = teacher_dataset(ctx)
    engine, metrics = _run_sft(ctx, ctx.job.sft, examples, student, init=False, start=ctx.student_init)
    return _export(ctx, engine), {**metrics, **stats}


STAGES = {
    StageKind.prepare: stage_prepare,
    StageKind.load: stage_load,
    StageKind.pretrain: stage_pretrain,
    StageKind.cold_start_sft: stage_sft,
    StageKind.sft: stage_sft,
    StageKind.reasoning_rl: stage_rl,
    StageKind.all_scenario_rl: stage_rl,
    StageKind.rejection_sampling: stage_rejection_sampling,
    StageKind.distill: stage_distill,
    StageKind.eval: stage_eval,
    StageKind.long_context: stage_pretrain,
    StageKind.passkey_eval: stage_passkey_eval,
}


# ---------------------------------------------------------------------------- helpers


def _keep(metrics: dict, *keys: str) -> dict:
    return {k: metrics[k] for k in keys if k in metrics}
