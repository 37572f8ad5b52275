"""The `prepare` stage: tokenizer, pretraining token shards, and the problem / SFT sets later stages read.

Everything is derived from the job config and written under the stage directory; later stages
find the files through the run manifest. Built-in data comes from r1core.data's seeded task
generators: pretraining and RL use the train split, evaluation the held-out test split.
"""

from __future__ import annotations

import json
import logging
import random
import re
from itertools import chain
from pathlib import Path

from r1core.data import (
    ChatFormat,
    Problem,
    Tokenizer,
    builtin_paragraphs,
    generate,
    load_problems_jsonl,
    prepare_shards,
    worked_solution,
)
from r1core.data.corpus import builtin_corpus
from r1core.data.jsonl import SkipStats, iter_records, require_object
from r1core.data.preflight import DataFile, parse_general_prompt, preflight
from r1core.data.sft import load_sft_jsonl, parse_problem_record
from r1core.train.checkpointing import atomic_write_text

from .config import StageKind

log = logging.getLogger(__name__)


def problems_to_jsonl(path: Path, problems: list[Problem]) -> None:
    lines = [
        json.dumps({"prompt": p.prompt, "answer": p.answer, "task": p.task, "meta": p.meta}) for p in problems
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _parse_prepared(obj) -> Problem:
    """A line written by problems_to_jsonl (it carries "meta"), or any record load_problems_jsonl accepts."""
    obj = require_object(obj)
    if (
        isinstance(obj.get("meta"), dict)
        and isinstance(obj.get("task"), str)
        and isinstance(obj.get("prompt"), str)
    ):
        return Problem(
            prompt=obj["prompt"], answer=str(obj.get("answer", "")), task=obj["task"], meta=obj["meta"]
        )
    return parse_problem_record(obj)


def read_problems(path: str | Path) -> list[Problem]:
    """Problems written by `problems_to_jsonl` (or any JSONL load_problems_jsonl accepts); bad lines are
    skipped, counted and logged with file:line."""
    return [p for _, p in iter_records(path, _parse_prepared)]


def data_files(job) -> list[DataFile]:
    """Every user data file the job names, with the parser the stage reading it uses."""
    d = job.data
    pretrain = (
        [] if job.hf_checkpoint else d.pretrain_files
    )  # with a checkpoint to start from, nothing pretrains
    files = [DataFile(f"data.pretrain_files[{i}]", p, "text") for i, p in enumerate(pretrain)]
    files += [
        DataFile(f"data.val_files[{i}]", p, "text")
        for i, p in enumerate([] if job.hf_checkpoint else d.val_files)
    ]
    for key, path, kind in (
        ("data.cold_start_jsonl", d.cold_start_jsonl, "sft"),
        ("data.rl_prompts_jsonl", d.rl_prompts_jsonl, "problems"),
        ("data.general_prompts_jsonl", d.general_prompts_jsonl, "general"),
        ("data.eval_jsonl", d.eval_jsonl, "problems"),
        ("rejection.non_reasoning_jsonl", job.rejection.non_reasoning_jsonl, "sft"),
    ):
        if path:
            files.append(DataFile(key, path, kind))
    return files


def preflight_data(job) -> None:
    """The data pre-flight (r1core.data.preflight) over every file the job names; DataError on failure."""
    preflight(data_files(job), strict=job.data.strict, max_bad_fraction=job.data.max_bad_fraction)


def _task_problems(data, n: int, split: str, seed: int) -> list[Problem]:
    """n problems spread evenly over data.tasks, interleaved."""
    per = [n // len(data.tasks) + (i < n % len(data.tasks)) for i in range(len(data.tasks))]
    groups = [
        generate(t, k, seed=seed, split=split, **data.task_kwargs.get(t, {})) for t, k in zip(data.tasks, per)
    ]
    return [g[i] for i in range(max(per)) for g in groups if i < len(g)]


def run_prepare(job, stage_dir: Path, skipped: dict[str, int] | None = None) -> dict:
    """Write everything later stages read; `skipped` receives the bad lines skipped per data setting."""
    d, seed = job.data, job.seed
    stats = {f.key: SkipStats() for f in data_files(job)}
    stage_dir.mkdir(parents=True, exist_ok=True)
    if d.tokenizer:
        tok = Tokenizer.from_file(d.tokenizer)
    else:
        sample = [p.prompt + worked_solution(p) for p in _task_problems(d, 4000, "train", seed)]
        tok = Tokenizer.train_bpe(sample + list(builtin_paragraphs()), vocab_size=d.vocab_size)
    if tok.vocab_size > job.model.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={job.model.vocab_size}")
    tok_path = stage_dir / "tokenizer.json"
    tok.save(tok_path)
    fmt = ChatFormat.for_tokenizer(tok)
    outputs = {"tokenizer": str(tok_path)}

    # with hf_checkpoint every pretrain stage loads the checkpoint instead; a long_context stage still trains
    if job.hf_checkpoint and not any(s.kind == StageKind.long_context for s in job.pipeline.stages):
        log.info("hf_checkpoint is set: no pretraining token shards written")
    else:
        outputs["shards"] = str(_shards(job, stage_dir, tok, fmt, stats))
        if (val := _val_shards(job, stage_dir, tok, fmt, stats)) is not None:
            outputs["val_shards"] = str(val)

    if d.rl_prompts_jsonl:
        rl = load_problems_jsonl(d.rl_prompts_jsonl, stats=stats["data.rl_prompts_jsonl"])
    else:
        rl = _task_problems(d, 20000, "train", seed + 1)
    problems_to_jsonl(stage_dir / "rl_prompts.jsonl", rl)
    if d.eval_jsonl:
        ev = load_problems_jsonl(d.eval_jsonl, stats=stats["data.eval_jsonl"])
    else:
        ev = _task_problems(d, d.eval_problems, "test", seed + 2)
    problems_to_jsonl(stage_dir / "eval.jsonl", ev[: d.eval_problems])
    outputs.update(rl_prompts=str(stage_dir / "rl_prompts.jsonl"), eval=str(stage_dir / "eval.jsonl"))

    cold = stage_dir / "cold_start.jsonl"
    if d.cold_start_jsonl:
        _write_sft(cold, load_sft_jsonl(d.cold_start_jsonl, stats["data.cold_start_jsonl"]))
    else:
        rows = [
            {"prompt": p.prompt, "response": worked_solution(p)}
            for p in _task_problems(d, d.cold_start_examples, "train", seed + 3)
        ]
        atomic_write_text(cold, "\n".join(json.dumps(r) for r in rows) + "\n")
    outputs["cold_start"] = str(cold)
    outputs["general_prompts"] = str(_general_prompts(d, stage_dir, stats.get("data.general_prompts_jsonl")))
    outputs["non_reasoning"] = str(_non_reasoning(job, stage_dir, stats.get("rejection.non_reasoning_jsonl")))
    if skipped is not None:
        skipped.update({key: st.n_skipped for key, st in stats.items()})
    log.info("prepared: %s", outputs)
    return outputs


def _shards(job, stage_dir: Path, tok: Tokenizer, fmt: ChatFormat, stats: dict) -> Path:
    d = job.data
    if d.pretrain_files:
        from r1core.data.shards import iter_documents

        docs = chain.from_iterable(
            iter_documents([p], stats=stats[f"data.pretrain_files[{i}]"])
            for i, p in enumerate(d.pretrain_files)
        )
    else:
        docs = _builtin_docs(job, fmt)
    shards = stage_dir / "shards"
    prepare_shards(docs, shards, tok, name="pretrain", overwrite=True)  # a failed earlier attempt's shards
    return shards


def _val_shards(job, stage_dir: Path, tok: Tokenizer, fmt: ChatFormat, stats: dict) -> Path | None:
    """Held-out documents for the validation loss: data.val_files, or the built-in corpus's documents on
    test-split problems (never in the corpus, which draws from the train split); None for user
    pretrain_files without val_files, or val_docs = 0."""
    d = job.data
    if d.val_files:
        from r1core.data.shards import iter_documents

        docs = chain.from_iterable(
            iter_documents([p], stats=stats.get(f"data.val_files[{i}]")) for i, p in enumerate(d.val_files)
        )
    elif d.pretrain_files or not d.val_docs:
        if d.pretrain_files:
            log.info("data.pretrain_files without data.val_files: no validation loss")
        return None
    else:
        docs = list(_builtin_docs(job, fmt, "test"))
    path = stage_dir / "val_shards"
    prepare_shards(docs, path, tok, name="val", overwrite=True)
    return path


def _write_sft(path: Path, examples) -> None:
    """The usable examples of a user SFT file, as (prompt, response, system) rows later stages read."""
    rows = [{"prompt": e.prompt, "response": e.response, "system": e.system} for e in examples]
    atomic_write_text(path, "\n".join(json.dumps(r) for r in rows) + "\n")


def _builtin_docs(job, fmt: ChatFormat, split: str = "train"):
    """The built-in corpus (train split, data.corpus_docs documents), or its held-out twin (test split,
    data.val_docs documents): the same tasks, direct answers and answer noise, without the prose, whose
    paragraphs are a fixed set the corpus repeats."""
    d = job.data
    prose = d.prose_fraction if split == "train" else 0.0
    mix = tuple((t, (1 - prose) / len(d.tasks), (dict(d.task_kwargs.get(t, {})),)) for t in d.tasks)
    mix = mix + (("text", prose, ({},)),)
    paragraphs = set(builtin_paragraphs())
    rng = random.Random(f"answer-noise/{job.seed}" + ("" if split == "train" else f"/{split}"))
    n = d.corpus_docs if split == "train" else d.val_docs
    for doc in builtin_corpus(n, seed=job.seed, mix=mix, split=split):
        if doc in paragraphs:
            yield doc + fmt.eos
            continue
        prompt, solution = doc.split(" ", 1)  # pretrain_text: prompt, a space, the worked solution
        if d.direct_fraction and rng.random() < d.direct_fraction:
            solution = direct_answer(solution, rng, d.direct_noise)
        elif d.answer_noise and rng.random() < d.answer_noise:
            solution = corrupt_answer(solution, rng)
        yield fmt.render_prompt(prompt) + fmt.strip_think_prefix(solution) + fmt.eos


_FINAL = re.compile(r"=(-?\d+)\n</think>\n\\boxed\{(-?\d+)\}$")


def _near_miss(value: str, rng: random.Random) -> str:
    return str(int(value) + rng.choice([-1, 1]) * rng.randint(1, 9))


def _final_value(solution: str) -> re.Match | None:
    """The match of a numeric worked solution's last line and box when they agree, else None."""
    m = _FINAL.search(solution)
    return m if m is not None and m.group(1) == m.group(2) else None


def direct_answer(solution: str, rng: random.Random, noise: float) -> str:
    """The problem answered at once: an empty think block and the boxed answer, which is a near miss
    (off by 1 to 9) with probability `noise`.

    A corpus that mixes these with worked solutions gives a base model two habits, answering at once
    (short, often wrong) and working it out (longer, more often right); R1-Zero's accuracy reward
    then has something to choose between, and the mean response length rises as it does
    (`data.direct_fraction`, `data.direct_noise`)."""
    m = _final_value(solution)
    if m is None:
        return solution  # not a numeric worked solution (countdown boxes an expression)
    answer = _near_miss(m.group(2), rng) if rng.random() < noise else m.group(2)
    return f"<think>\n</think>\n\\boxed{{{answer}}}"


def corrupt_answer(solution: str, rng: random.Random) -> str:
    """The same worked solution with a wrong integer result in its last reasoning line and its box.

    A base model pretrained on such data can compute the answer but samples a wrong one part of the
    time, the situation R1-Zero's verifiable rewards correct (the CPU demo's `data.answer_noise`)."""
    m = _final_value(solution)
    if m is None:
        return solution
    wrong = _near_miss(m.group(1), rng)
    return solution[: m.start()] + f"={wrong}\n</think>\n\\boxed{{{wrong}}}"


GENERAL_PROMPTS = (
    "Say something about the river.",
    "Describe the old lighthouse.",
    "Write one sentence about bread.",
    "Tell me about the morning market.",
    "What do you know about the library?",
    "Describe a quiet evening.",
)


def _general_prompts(d, stage_dir: Path, stats: SkipStats | None = None) -> Path:
    """Prompts for the all-scenario stage's reward model (the built-in set when none is given)."""
    path = stage_dir / "general_prompts.jsonl"
    if d.general_prompts_jsonl:  # the usable records only, so the RL stage reads a clean file
        rows = [row for _, row in iter_records(d.general_prompts_jsonl, parse_general_prompt, stats)]
        atomic_write_text(path, "\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        atomic_write_text(
            path, "\n".join(json.dumps({"prompt": p, "answer": ""}) for p in GENERAL_PROMPTS) + "\n"
        )
    return path


def _non_reasoning(job, stage_dir: Path, stats: SkipStats | None = None) -> Path:
    """Non-reasoning SFT examples mixed into the rejection-sampling dataset (R1 §2.3.3)."""
    path = stage_dir / "non_reasoning.jsonl"
    src = job.rejection.non_reasoning_jsonl
    if src:
        _write_sft(path, load_sft_jsonl(src, stats))
        return path
    rows = []
    for i, para in enumerate(builtin_paragraphs()):
        first = para.split(". ")[0].rstrip(".") + "."
        # R1 answers simple non-reasoning queries with an empty think block
        rows.append({"prompt": GENERAL_PROMPTS[i % len(GENERAL_PROMPTS)], "response": "</think>\n" + first})
    atomic_write_text(path, "\n".join(json.dumps(r) for r in rows) + "\n")
    return path
