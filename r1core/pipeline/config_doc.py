"""docs/config.md, generated from the typed job schema: every setting with its type, default and meaning.

    python -m r1core.pipeline.config_doc > docs/config.md

The meaning of a setting is the comment on its line in the dataclass that declares it, so the
schema stays the one place a setting is described; tests/test_config_doc.py keeps the file in sync.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
import typing

from r1core.config_notes import field_notes
from r1core.model.args import ModelArgs, presets

from .config import JobConfig, StageKind

DEFAULT_PRESET = "tiny"  # conf/config.yaml's `model:` default

HEADER = f"""# Configuration reference

Every setting of `r1core run`, generated from the typed schema (`r1core.pipeline.config.JobConfig`
and the dataclasses it nests) by `python -m r1core.pipeline.config_doc`. Set any of them on the
command line as `key=value` (`rl.group_size=16`, `data.strict=true`, `'data.pretrain_files=[a.jsonl]'`);
a stage's `overrides` set them for that stage only. `r1core run --cfg job` prints the composed values.
Unknown keys, with or without a leading `+`, stop the run before any work.

Defaults are the schema's. Two config groups replace whole sections: `model=<preset>` (`tiny` by
default; also {", ".join(f"`{p}`" for p in presets if p != DEFAULT_PRESET)}) sets every `model.*` key, and
`pipeline=<name>` (`default`, `r1`, `r1_zero`, `distill`) sets `pipeline.*`; the embedded `default`
pipeline, a CPU demo, also sets smaller step counts and the arithmetic data it trains on. The `model.*`
defaults below are the `{DEFAULT_PRESET}` preset's. With `hf_checkpoint` set, the model's shape comes from the
checkpoint's `config.json` instead.
"""


def _type_name(t) -> str:
    if isinstance(t, type) and issubclass(t, enum.Enum):
        return " \\| ".join(f"`{m.value}`" for m in t)
    if isinstance(t, type):
        return t.__name__
    return str(t).replace("typing.", "").replace("NoneType", "None").replace(" | ", " \\| ")


def _default(f: dataclasses.Field, instance) -> str:
    if instance is not None:
        value = getattr(instance, f.name)
    elif f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value == "???":
        return "required"
    if isinstance(value, enum.Enum):
        value = value.value
    if value == "":
        return '`""` (unset)'
    try:  # as it is written on the command line / in YAML: true, "text", [1, 2]
        return f"`{json.dumps(value)}`"
    except TypeError:
        return f"`{value!r}`"


def rows(cls: type, prefix: str = "", instance=None) -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every leaf setting under `cls`."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t, key = hints[f.name], prefix + f.name
        if instance is not None:
            nested = getattr(instance, f.name)
        else:  # a nested section's defaults are its field's factory's (sft: LMTrainConfig(steps=150, ...))
            nested = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if t is ModelArgs and prefix:  # distill.student: the same keys as `model`
            note = field_notes(cls).get(f.name) or ""
            note = f"{note} (the same keys as `model.*`)".strip()
            out.append((key, "ModelArgs", "a dense 4-layer tiny model", note))
        elif t is ModelArgs:
            out += rows(ModelArgs, key + ".", presets[DEFAULT_PRESET])
        elif dataclasses.is_dataclass(t):
            out += rows(t, key + ".", nested if dataclasses.is_dataclass(nested) else None)
        elif typing.get_origin(t) is list and dataclasses.is_dataclass(typing.get_args(t)[0]):
            out += rows(typing.get_args(t)[0], key + "[].")
        else:
            out.append((key, _type_name(t), _default(f, instance), field_notes(cls).get(f.name, "")))
    return out


def _cell(text: str) -> str:
    """A comment as a table cell: no column breaks, and `<think>` shown rather than read as HTML."""
    return text.replace("|", "/").replace("<", "&lt;").replace(">", "&gt;")


def render() -> str:
    sections: dict[str, list] = {}
    for key, t, default, meaning in rows(JobConfig):
        sections.setdefault(key.split(".")[0] if "." in key else "", []).append((key, t, default, meaning))
    out = [HEADER]
    for name, items in sections.items():
        out.append(f"## {name or 'job'}\n")
        if name == "pipeline":
            out.append(f"Stage kinds: {', '.join(f'`{k.value}`' for k in StageKind)}.\n")
        out.append("| key | type | default | meaning |\n| --- | --- | --- | --- |")
        out += [f"| `{k}` | {t} | {d} | {_cell(m)} |" for k, t, d, m in items]
        out.append("")
    return "\n".join(out)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
