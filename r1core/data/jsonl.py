"""JSONL reading with counted, logged skips.

Real datasets carry the odd truncated line or a record with a missing field. One bad line must not
abort a multi-hour preparation, and it must not vanish silently either: every skip is counted by
reason, the first few are logged with file:line, and a file where *nothing* is usable raises an
error that names the first problem (almost always a wrong field name or the wrong file).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class RecordError(ValueError):
    """Raised by a record parser to reject one line; the message is the logged reason."""


@dataclass
class SkipStats:
    """Counts of usable and skipped lines of one or more JSONL files."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_problem: str | None = None  # "file:line: reason" of the first skip
    max_logged: int = 5

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, where: str, reason: str) -> None:
        # The reason's first words are the category ("bad JSON: ..." -> "bad JSON").
        self.skipped[reason.split(":")[0]] += 1
        if self.first_problem is None:
            self.first_problem = f"{where}: {reason}"
        if self.n_skipped <= self.max_logged:
            log.warning("skipping %s: %s", where, reason)
        elif self.n_skipped == self.max_logged + 1:
            log.warning("further skipped lines are only counted")

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return f"kept {self.kept}, skipped {self.n_skipped}" + (f" ({reasons})" if reasons else "")


def iter_records(
    path: str | Path, parse: Callable[[Any], T], stats: SkipStats | None = None
) -> Iterator[tuple[int, T]]:
    """Yield (line number, parse(obj)) for every usable line of a JSONL file.

    `parse` receives the decoded JSON value and raises RecordError to skip it. Blank lines are
    ignored without counting. If the file has lines but none is usable, raises ValueError naming
    the first problem's file:line.
    """
    path = Path(path)
    stats = stats if stats is not None else SkipStats()
    kept_before, seen = stats.kept, 0
    first_here: str | None = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            seen += 1
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line.rstrip("\r\n"))  # else a torn line reads as a control character
            except json.JSONDecodeError as e:
                reason = f"bad JSON: {e.msg} (column {e.colno})"
            else:
                try:
                    value = parse(obj)
                except RecordError as e:
                    reason = str(e)
                else:
                    stats.kept += 1
                    yield lineno, value
                    continue
            first_here = first_here or f"{where}: {reason}"
            stats.skip(where, reason)
    if seen and stats.kept == kept_before:
        raise ValueError(
            f"no usable record in {path} ({seen} non-empty lines); first problem at {first_here}"
        )
    if stats.n_skipped:
        log.info("%s: %s", path, stats.summary())


def pick_string(obj: dict, keys: tuple[str, ...], what: str) -> str:
    """The first of `keys` present in obj, which must be a non-empty string (else RecordError)."""
    for key in keys:
        if key in obj:
            value = obj[key]
            if not isinstance(value, str):
                raise RecordError(f"non-string field: {key!r} is {type(value).__name__}")
            if not value.strip():
                raise RecordError(f"empty field: {key!r}")
            return value
    raise RecordError(f"missing field: {what} (one of {', '.join(keys)})")


def require_object(obj: Any) -> dict:
    if not isinstance(obj, dict):
        raise RecordError(f"not an object: {type(obj).__name__}")
    return obj
