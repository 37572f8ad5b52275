"""Splitting an R1 response into reasoning and answer, and pulling answers or code out of it.

Every scanner here is linear in the response (or bounded by `max_chars` per candidate), because
responses are untrusted and can be megabytes long: no regex with nested quantifiers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Split:
    """`reasoning`: the think block's content (None when there is none); `final`: the text after
    the last `</think>`, the whole response without a think block, or None when a `<think>` was
    opened and never closed (a truncated response has no answer: it would be read out of the
    reasoning)."""

    reasoning: str | None
    final: str | None


def as_text(response: str | bytes) -> str | None:
    """The response as valid UTF-8 text; None for undecodable bytes or lone surrogates (which
    come from decoding with surrogateescape and break every downstream encoder)."""
    if isinstance(response, (bytes, bytearray)):
        try:
            return bytes(response).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(response, str):
        return None
    try:
        response.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return response


def split_think(response: str) -> Split:
    close = response.rfind(THINK_CLOSE)
    if close >= 0:
        open_ = response.find(THINK_OPEN)
        start = open_ + len(THINK_OPEN) if 0 <= open_ < close else 0
        return Split(response[start:close], response[close + len(THINK_CLOSE) :])
    open_ = response.find(THINK_OPEN)
    if open_ >= 0:
        return Split(response[open_ + len(THINK_OPEN) :], None)
    return Split(None, response)


class TooComplex(ValueError):
    """An answer candidate longer or more deeply nested than the configured caps."""


def _braced(text: str, start: int, max_chars: int, max_depth: int) -> str | None:
    """Content of the brace group opening at text[start] == "{"; None if it never closes.

    `\\{` and `\\}` are literal braces in LaTeX and do not open or close a group."""
    depth, i, end = 0, start, min(len(text), start + max_chars + 2)
    while i < end:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
            if depth > max_depth:
                raise TooComplex(f"braces nested deeper than {max_depth}")
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    if end < len(text):
        raise TooComplex(f"boxed answer longer than {max_chars} characters")
    return None


_BOXED = ("\\boxed", "\\fbox")


def last_boxed(text: str, max_chars: int = 1000, max_depth: int = 32) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`).

    A truncated last box falls back to the one before it; raises TooComplex past the caps."""
    pos = len(text)
    while True:
        pos = max(text.rfind(tag, 0, pos) for tag in _BOXED)
        if pos < 0:
            return None
        j = pos + (len("\\boxed") if text.startswith("\\boxed", pos) else len("\\fbox"))
        if j < len(text) and text[j] == "{":
            inner = _braced(text, j, max_chars, max_depth)
            if inner is not None:
                return inner
        elif j < len(text) and text[j] == " ":
            # `\boxed 5`: the argument is the next token.
            m = re.match(r" +([^\s$]+)", text[j : j + max_chars + 1])
            if m:
                return m.group(1)


_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_TRAILING = " \t.。,;:!*$"


def _tag_content(text: str, open_tag: str, close_tag: str) -> str | None:
    close = text.rfind(close_tag)
    if close < 0:
        return None
    open_ = text.rfind(open_tag, 0, close)
    return None if open_ < 0 else text[open_ + len(open_tag) : close]


def _first_statement(text: str) -> str:
    """What follows "the answer is": the math span when it opens with `$`, else the rest of the
    sentence ("$5$. I hope it is correct." and "5. Done." both give "5")."""
    line = text.split("\n", 1)[0].strip().lstrip("*").strip()
    if line.startswith("$"):
        body = line.lstrip("$")  # `$5$` or `$$5$$`
        end = body.find("$")
        if end > 0:
            return body[:end].strip()
    return re.split(r"\.\s", line, maxsplit=1)[0].rstrip(_TRAILING).strip("$*").strip()


def extract_answer(final: str, max_chars: int = 1000, max_depth: int = 32) -> tuple[str | None, str]:
    """The final answer in `final` (the text after `</think>`) and how it was found.

    Order: last `\\boxed{}`, then `<answer>...</answer>`, then "the answer is X" (rest of that
    line), then the last number. Returns (None, "none") when nothing matches."""
    boxed = last_boxed(final, max_chars, max_depth)
    if boxed is not None:
        return boxed.strip(), "boxed"
    tagged = _tag_content(final, "<answer>", "</answer>")
    if tagged is not None and tagged.strip():
        return tagged.strip().strip("$").strip(), "tag"
    said = None
    for said in _ANSWER_IS.finditer(final):
        pass
    if said is not None:
        line = _first_statement(final[said.end() : said.end() + max_chars])
        if line:
            return line, "answer_is"
    number = None
    for number in _NUMBER.finditer(final[-max_chars * 4 :]):
        pass
    if number is not None:
        return number.group(0), "last_number"
    return None, "none"


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)```", re.IGNORECASE | re.DOTALL)


def extract_code(final: str) -> str | None:
    """The last complete ```python (or py / python3) fenced block; None if there is none."""
    block = None
    for block in _FENCE.finditer(final):
        pass
    return None if block is None else block.group(1)
