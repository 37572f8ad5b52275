"""Pre-flight check of every user data file, before any stage runs.

One behaviour for bad lines in every dataset kind: each line of each configured file is parsed
exactly as the stage that reads it will parse it. A bad line (not JSON, not an object, a missing or
empty field) is named as `file:line: problem`; it is skipped and counted, unless `strict` is set,
which fails at the first one. A file fails as a whole when more than `max_bad_fraction` of its
lines are bad (almost always the wrong file or a renamed field), or when it holds no usable record.
Hours into a run is the wrong time to learn that the evaluation set had no answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from r1core.data.jsonl import RecordError, SkipStats, iter_records, pick_string, require_object
from r1core.data.sft import PROMPT_KEYS, parse_problem_record, parse_sft_record

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file that cannot be used as configured; the message names the file (and line)."""


def parse_general_prompt(obj) -> dict:
    """An all-scenario RL prompt: `prompt|problem|question`, optional string `answer` and `reference`."""
    obj = require_object(obj)
    row = {"prompt": pick_string(obj, PROMPT_KEYS, "prompt")}
    for key in ("answer", "reference"):
        value = obj.get(key, "")
        if not isinstance(value, str):
            raise RecordError(f"non-string field: {key!r} is {type(value).__name__}")
        row[key] = value
    return row


def parse_text_record(obj) -> str:
    return pick_string(require_object(obj), ("text",), "text field 'text'")


# dataset kind -> the parser its stage uses (RecordError rejects one line)
PARSERS: dict[str, Callable[[Any], Any]] = {
    "problems": parse_problem_record,  # RL prompts and evaluation problems with gold answers
    "sft": parse_sft_record,  # (prompt, response) pairs or chats
    "general": parse_general_prompt,  # all-scenario RL prompts judged by the reward model
    "text": parse_text_record,  # pretraining documents in .jsonl / .json
}


@dataclass(frozen=True)
class DataFile:
    key: str  # the config key naming the file, e.g. "data.eval_jsonl"
    path: str
    kind: str  # a key of PARSERS


class _Strict(SkipStats):
    def skip(self, where: str, reason: str) -> None:
        raise DataError(f"{where}: {reason} (data.strict=true: no bad line is skipped)")


def check_file(f: DataFile, strict: bool = False, max_bad_fraction: float = 0.0) -> SkipStats:
    """Parse every line of one file; returns its counts or raises DataError naming `key`, file and line."""
    path = Path(f.path)
    if not path.is_file():
        raise DataError(f"{f.key}={f.path!r} does not exist or is not a file")
    if f.kind == "text" and path.suffix not in (".jsonl", ".json"):
        with open(path, "rb") as fh:  # plain text: one document per line; only unreadable bytes are bad
            lines = sum(1 for line in fh if line.strip())
        if not lines:
            raise DataError(f"{f.key}={f.path!r} holds no non-empty line")
        return SkipStats(kept=lines)
    stats = _Strict() if strict else SkipStats()
    try:
        for _ in iter_records(path, PARSERS[f.kind], stats):
            pass
    except DataError:
        raise
    except ValueError as e:  # iter_records: no usable record at all
        raise DataError(f"{f.key}: {e}") from None
    total = stats.kept + stats.n_skipped
    if not total:
        raise DataError(f"{f.key}={f.path!r} holds no record")
    if stats.n_skipped > max_bad_fraction * total:
        raise DataError(
            f"{f.key}: {stats.n_skipped} of {total} lines of {path} are bad "
            f"({stats.n_skipped / total:.1%} > data.max_bad_fraction={max_bad_fraction:g}; "
            f"{stats.summary()}); first: {stats.first_problem}"
        )
    return stats


def preflight(
    files: list[DataFile], strict: bool = False, max_bad_fraction: float = 0.0
) -> dict[str, SkipStats]:
    """check_file over every file, logging one summary line for each file with skipped lines."""
    out = {}
    for f in files:
        stats = out[f.key] = check_file(f, strict, max_bad_fraction)
        if stats.n_skipped:
            log.warning(
                "%s=%s: %s; bad lines are skipped (data.strict=true fails instead)",
                f.key,
                f.path,
                stats.summary(),
            )
    return out
