"""The comments beside a config dataclass's fields, read from its source: the one description of a
setting, shown by docs/config.md (r1core.pipeline.config_doc) and by command-line help
(`python -m r1core.train --help`). Standard library only, so any layer may use it."""

from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize
from functools import cache


@cache
def field_notes(cls: type) -> dict[str, str]:
    """field name -> the comment on the line (or the last line) of its declaration in `cls`, else the
    comment lines directly above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    by_line = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
    body = ast.parse(source).body[0].body
    out = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = range(node.lineno, node.end_lineno + 1)
            note = next((by_line[i] for i in reversed(lines) if i in by_line), "")
            above, i = [], node.lineno - 1
            while not note and i in by_line and source.splitlines()[i - 1].lstrip().startswith("#"):
                above.insert(0, by_line[i])
                i -= 1
            # a single line above is a section header ("# MoE"), not the field's description
            out[node.target.id] = note or (" ".join(above) if len(above) > 1 else "")
    return out
