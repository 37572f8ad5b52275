"""SFT data: JSONL in the common shapes -> (prompt, response) pairs -> packed training rows.

Accepted record shapes (first key present wins, in this order):
    {"prompt" | "problem" | "question": str, "response" | "completion" | "solution" | "answer": str,
     "system": str (optional)}
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}   (ShareGPT)
For chats, the pair is the last assistant turn and the user turn before it (earlier turns are
dropped). Malformed lines are skipped, counted by reason and logged with file:line.

Packed rows (PackedRow, all [T] int64): documents laid end to end, never split across rows;
labels are next-token targets only where the target is a response token, so the prompt, the token
after each document's end and the padding carry IGNORE_INDEX; doc_ids number the documents of a row
(padding is one more document) and positions restart at 0 in each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from r1core.data.jsonl import RecordError, SkipStats, iter_records, pick_string, require_object
from r1core.data.resumable import EpochCursor
from r1core.data.shards import IGNORE_INDEX
from r1core.data.solutions import extract_boxed
from r1core.data.tasks import Problem
from r1core.data.tokenizer import ChatFormat, Tokenizer

log = logging.getLogger(__name__)

PROMPT_KEYS = ("prompt", "problem", "question")
RESPONSE_KEYS = ("response", "completion", "solution", "answer")
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class SFTExample:
    prompt: str
    response: str
    system: str = ""


def _turns(obj: dict) -> list[tuple[str, str]]:
    key, role_key, text_key = (
        ("messages", "role", "content") if "messages" in obj else ("conversations", "from", "value")
    )
    turns = obj[key]
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"bad chat: {key!r} is not a non-empty list")
    out = []
    for i, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get(role_key), str)
            or not isinstance(turn.get(text_key), str)
        ):
            raise RecordError(f"bad chat: {key}[{i}] needs string {role_key!r} and {text_key!r}")
        role = (
            _SHAREGPT_ROLES.get(turn[role_key], turn[role_key]) if key == "conversations" else turn[role_key]
        )
        out.append((role, turn[text_key]))
    return out


def _parse_chat(obj: dict) -> SFTExample:
    turns = _turns(obj)
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None:
        raise RecordError("bad chat: no assistant turn")
    user = max((i for i, (role, _) in enumerate(turns[:last]) if role == "user"), default=None)
    if user is None:
        raise RecordError("bad chat: no user turn before the last assistant turn")
    system = turns[0][1] if turns[0][0] == "system" else ""
    prompt, response = turns[user][1], turns[last][1]
    if not prompt.strip() or not response.strip():
        raise RecordError("empty field: chat turn")
    return SFTExample(prompt, response, system)


def parse_sft_record(obj) -> SFTExample:
    """One JSON value -> SFTExample, or RecordError naming what is wrong."""
    obj = require_object(obj)
    if "messages" in obj or "conversations" in obj:
        return _parse_chat(obj)
    prompt = pick_string(obj, PROMPT_KEYS, "prompt")
    response = pick_string(obj, RESPONSE_KEYS, "response")
    system = obj.get("system", "")
    if not isinstance(system, str):
        raise RecordError(f"non-string field: 'system' is {type(system).__name__}")
    return SFTExample(prompt, response, system)


def load_sft_jsonl(
    paths: str | Path | Iterable[str | Path], stats: SkipStats | None = None
) -> list[SFTExample]:
    """All usable examples of one or more JSONL files (skips counted in `stats`)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    stats = stats if stats is not None else SkipStats()
    out = [ex for p in paths for _, ex in iter_records(p, parse_sft_record, stats)]
    log.info("SFT data %s: %s", ", ".join(map(str, paths)), stats.summary())
    return out


class SFTDoc(NamedTuple):
    ids: np.ndarray  # [n] int64: rendered prompt, then response, then the stop token
    n_prompt: int  # ids[:n_prompt] is the prompt (no loss on predicting it)


def tokenize_sft(
    examples: list[SFTExample],
    tok: Tokenizer,
    fmt: ChatFormat,
    max_len: int,
    progress: bool = False,
    batch: int = 1024,
) -> list[SFTDoc]:
    """Encode examples with the chat format; responses longer than the room left are truncated
    (their stop token is lost), examples whose prompt alone fills max_len are dropped; both counted.

    Prompt and response are encoded separately, exactly as at generation time, where the prompt is
    encoded alone and the model continues after it.
    """
    docs, n_trunc, n_drop = [], 0, 0
    stop = fmt.stop_ids[0]
    bar = tqdm(total=len(examples), desc="tokenize SFT", unit="ex", disable=not progress, mininterval=1.0)
    for lo in range(0, len(examples), batch):
        chunk = examples[lo : lo + batch]
        prompts = tok.encode_batch([fmt.render_prompt(e.prompt, e.system or None) for e in chunk])
        responses = tok.encode_batch([fmt.strip_think_prefix(e.response) for e in chunk])
        for p, r in zip(prompts, responses):
            ids = p + r + [stop]
            if len(p) >= max_len:
                n_drop += 1
                continue
            if len(ids) > max_len:
                n_trunc += 1
                ids = ids[:max_len]
            docs.append(SFTDoc(np.asarray(ids, dtype=np.int64), len(p)))
        bar.update(len(chunk))
    bar.close()
    if n_trunc or n_drop:
        log.warning(
            "tokenize_sft: %d responses truncated, %d examples dropped (prompt >= %d tokens)",
            n_trunc,
            n_drop,
            max_len,
        )
    return docs


class PackedRow(NamedTuple):
    tokens: torch.Tensor  # [T]
    labels: torch.Tensor  # [T] next token on response targets, else IGNORE_INDEX
    doc_ids: torch.Tensor  # [T] 0, 1, ... per document; padding is the next id
    positions: torch.Tensor  # [T] restart at 0 in every document


def pack_row(docs: list[SFTDoc], seq_len: int, pad_id: int) -> PackedRow:
    """Lay `docs` (total length <= seq_len) end to end and pad."""
    tokens = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    doc_ids = np.full(seq_len, len(docs), dtype=np.int64)
    positions = np.zeros(seq_len, dtype=np.int64)
    total = sum(len(doc.ids) for doc in docs)
    if total > seq_len:
        raise ValueError(f"documents of {total} tokens do not fit a row of {seq_len}")
    at = 0
    for d, (ids, n_prompt) in enumerate(docs):
        n = len(ids)
        tokens[at : at + n] = ids
        # label[i] = ids[i+1] when ids[i+1] is a response token: i in [n_prompt-1, n-2]
        first = max(n_prompt - 1, 0)
        labels[at + first : at + n - 1] = ids[first + 1 :]
        doc_ids[at : at + n] = d
        positions[at : at + n] = np.arange(n)
        at += n
    positions[at:] = np.arange(seq_len - at)
    return PackedRow(*(torch.from_numpy(a) for a in (tokens, labels, doc_ids, positions)))


class PackedSFTDataset(EpochCursor):
    """Rows of greedily packed SFT documents; resumable and split across DP ranks.

    Each epoch shuffles the documents by (seed, epoch) and gives rank r every dp_size-th of them
    (equal counts; the remainder is dropped). Rows take the next documents in that order until the
    next one does not fit, so the state is (epoch, index of the next document). Ranks may pack
    into different numbers of rows: with loop=True (the default) the trainer's step count decides.
    """

    def __init__(
        self,
        docs: list[SFTDoc],
        seq_len: int,
        pad_id: int,
        seed: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        shuffle: bool = True,
        loop: bool = True,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        too_long = [i for i, d in enumerate(docs) if len(d.ids) > seq_len]
        if too_long:
            raise ValueError(
                f"{len(too_long)} documents exceed seq_len {seq_len} (first: #{too_long[0]}); "
                "tokenize_sft with max_len=seq_len truncates them"
            )
        self.docs, self.seq_len, self.pad_id = docs, seq_len, pad_id
        self.seed, self.shuffle, self.loop = seed, shuffle, loop
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = len(docs) // dp_size
        if self.per_rank == 0:
            raise ValueError(f"{len(docs)} documents cannot feed {dp_size} ranks")
        self.epoch, self.pos = 0, 0

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.docs)
        perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return perm[: self.per_rank * self.dp_size][self.dp_rank :: self.dp_size]

    def __iter__(self) -> Iterator[PackedRow]:
        while True:
            order = self.order(self.epoch)
            while self.pos < len(order):
                row, used = [], 0
                while self.pos < len(order) and used + len(self.docs[order[self.pos]].ids) <= self.seq_len:
                    row.append(self.docs[order[self.pos]])
                    used += len(row[-1].ids)
                    self.pos += 1  # advance before yielding: state_dict() then names the next row's start
                yield pack_row(row, self.seq_len, self.pad_id)
            self.epoch, self.pos = self.epoch + 1, 0
            if not self.loop:
                return

    def identity(self) -> dict:
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "n_docs": len(self.docs),
        }


def _gold_answer(obj: dict) -> str:
    if "answer" in obj:
        value = obj["answer"]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise RecordError(f"non-string field: 'answer' is {type(value).__name__}")
        value = str(value).strip()
        if "\n#### " in value:  # GSM8K: worked solution, then "#### <answer>"
            value = value.rsplit("\n#### ", 1)[1].strip()
        if not value:
            raise RecordError("empty field: 'answer'")
        return value
    if "solution" not in obj:
        raise RecordError("missing field: answer (one of answer, solution)")
    solution = pick_string(obj, ("solution",), "solution")
    boxed = extract_boxed(solution)
    if not boxed:
        raise RecordError("no answer: 'solution' has no \\boxed{}")
    return boxed


def parse_problem_record(obj, task: str = "math") -> Problem:
    """One JSON value -> Problem (see load_problems_jsonl), or RecordError naming what is wrong."""
    obj = require_object(obj)
    prompt = pick_string(obj, PROMPT_KEYS, "prompt")
    answer = _gold_answer(obj)
    kind = obj.get("task") if isinstance(obj.get("task"), str) and obj["task"].strip() else task
    meta = {k: v for k, v in obj.items() if k not in PROMPT_KEYS + ("answer", "task")}
    return Problem(prompt=prompt, answer=answer, task=kind, meta=meta)


def load_problems_jsonl(
    path: str | Path, task: str = "math", stats: SkipStats | None = None
) -> list[Problem]:
    """RL prompts with gold answers from JSONL (`prompt|problem|question` + `answer|solution`).

    The gold answer is `answer` (GSM8K's "#### n" tail taken when present), else the last \\boxed{}
    of `solution`. Problem.task is the record's string "task" field when present, else `task`; the
    record's other fields go to Problem.meta (reward functions read e.g. numbers/target or tests),
    with meta["source"] = "file:line".
    """
    out = []
    parse = lambda obj: parse_problem_record(obj, task)  # noqa: E731
    for lineno, problem in iter_records(path, parse, stats):
        problem.meta["source"] = f"{path}:{lineno}"
        out.append(problem)
    return out
