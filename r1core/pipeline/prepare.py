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
from pathlib import Path

from r1core.data import (ChatFormat, Problem, Tokenizer, builtin_paragraphs, generate, load_problems_jsonl,
                         prepare_shards, worked_solution)
from r1core.data.corpus import builtin_corpus
from r1core.train.checkpointing import atomic_write_text

log = logging.getLogger(__name__)


def problems_to_jsonl(path: Path, problems: list[Problem]) -> None:
    lines = [json.dumps({"prompt": p.prompt, "answer": p.answer, "task": p.task, "meta": p.meta}) for p in problems]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_problems(path: str | Path) -> list[Problem]:
    """Problems written by `problems_to_jsonl` (or any JSONL load_problems_jsonl accepts)."""
    out = []
    with open(path) as f:
        first = f.readline()
    if first and "meta" in json.loads(first):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    out.append(Problem(prompt=r["prompt"], answer=r["answer"], task=r["task"], meta=r["meta"]))
        return out
    return load_problems_jsonl(path)


def _task_problems(data, n: int, split: str, seed: int) -> list[Problem]:
    """n problems spread evenly over data.tasks, interleaved."""
    per = [n // len(data.tasks) + (i < n % len(data.tasks)) for i in range(len(data.tasks))]
    groups = [generate(t, k, seed=seed, split=split, **data.task_kwargs.get(t, {})) for t, k in zip(data.tasks, per)]
    return [g[i] for i in range(max(per)) for g in groups if i < len(g)]


def chat_document(fmt: ChatFormat, p: Problem) -> str:
    """A problem and its worked solution in the chat format the RL stages prompt with."""
    return fmt.render_prompt(p.prompt) + fmt.strip_think_prefix(worked_solution(p)) + fmt.eos


def run_prepare(job, stage_dir: Path) -> dict:
    d, seed = job.data, job.seed
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

    if d.pretrain_files:
        from r1core.data.shards import iter_documents

        docs = iter_documents(d.pretrain_files)
    else:
        docs = _builtin_docs(job, fmt)
    shards = stage_dir / "shards"
    prepare_shards(docs, shards, tok, name="pretrain")
    outputs["shards"] = str(shards)

    rl = read_problems(d.rl_prompts_jsonl) if d.rl_prompts_jsonl else _task_problems(d, 20000, "train", seed + 1)
    problems_to_jsonl(stage_dir / "rl_prompts.jsonl", rl)
    ev = read_problems(d.eval_jsonl) if d.eval_jsonl else _task_problems(d, d.eval_problems, "test", seed + 2)
    problems_to_jsonl(stage_dir / "eval.jsonl", ev[: d.eval_problems])
    outputs.update(rl_prompts=str(stage_dir / "rl_prompts.jsonl"), eval=str(stage_dir / "eval.jsonl"))

    cold = stage_dir / "cold_start.jsonl"
    if d.cold_start_jsonl:
        cold.write_bytes(Path(d.cold_start_jsonl).read_bytes())
    else:
        rows = [{"prompt": p.prompt, "response": worked_solution(p)}
                for p in _task_problems(d, d.cold_start_examples, "train", seed + 3)]
        atomic_write_text(cold, "\n".join(json.dumps(r) for r in rows) + "\n")
    outputs["cold_start"] = str(cold)
    outputs["general_prompts"] = str(_general_prompts(d, stage_dir))
    outputs["non_reasoning"] = str(_non_reasoning(job, stage_dir))
    log.info("prepared: %s", outputs)
    return outputs


def _builtin_docs(job, fmt: ChatFormat):
    d = job.data
    mix = tuple((t, (1 - d.prose_fraction) / len(d.tasks), (dict(d.task_kwargs.get(t, {})),)) for t in d.tasks)
    mix = mix + (("text", d.prose_fraction, ({},)),)
    paragraphs = set(builtin_paragraphs())
    rng = random.Random(f"answer-noise/{job.seed}")
    for doc in builtin_corpus(d.corpus_docs, seed=job.seed, mix=mix):
        if doc in paragraphs:
            yield doc + fmt.eos
            continue
        prompt, solution = doc.split(" ", 1)  # pretrain_text: prompt, a space, the worked solution
        if d.answer_noise and rng.random() < d.answer_noise:
            solution = corrupt_answer(solution, rng)
        yield fmt.render_prompt(prompt) + fmt.strip_think_prefix(solution) + fmt.eos


def corrupt_answer(solution: str, rng: random.Random) -> str:
    """The same worked solution with a wrong integer result in its last reasoning line and its box.

    A base model pretrained on such data can compute the answer but samples a wrong one part of the
    time, the situation R1-Zero's verifiable rewards correct (the CPU demo's `data.answer_noise`)."""
    m = re.search(r"=(-?\d+)\n</think>\n\\boxed\{(-?\d+)\}$", solution)
    if m is None or m.group(1) != m.group(2):
        return solution
    wrong = str(int(m.group(1)) + rng.choice([-1, 1]) * rng.randint(1, 9))
    return solution[: m.start()] + f"={wrong}\n</think>\n\\boxed{{{wrong}}}"


GENERAL_PROMPTS = (
    "Say something about the river.", "Describe the old lighthouse.", "Write one sentence about bread.",
    "Tell me about the morning market.", "What do you know about the library?", "Describe a quiet evening.",
)


def _general_prompts(d, stage_dir: Path) -> Path:
    """Prompts for the all-scenario stage's reward model (the built-in set when none is given)."""
    path = stage_dir / "general_prompts.jsonl"
    if d.general_prompts_jsonl:
        path.write_bytes(Path(d.general_prompts_jsonl).read_bytes())
    else:
        atomic_write_text(path, "\n".join(json.dumps({"prompt": p, "answer": ""}) for p in GENERAL_PROMPTS) + "\n")
    return path


def _non_reasoning(job, stage_dir: Path) -> Path:
    """Non-reasoning SFT examples mixed into the rejection-sampling dataset (R1 §2.3.3)."""
    path = stage_dir / "non_reasoning.jsonl"
    src = job.rejection.non_reasoning_jsonl
    if src:
        path.write_bytes(Path(src).read_bytes())
        return path
    rows = []
    for i, para in enumerate(builtin_paragraphs()):
        first = para.split(". ")[0].rstrip(".") + "."
        # R1 answers simple non-reasoning queries with an empty think block
        rows.append({"prompt": GENERAL_PROMPTS[i % len(GENERAL_PROMPTS)], "response": "</think>\n" + first})
    atomic_write_text(path, "\n".join(json.dumps(r) for r in rows) + "\n")
    return path
