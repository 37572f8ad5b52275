"""Data layer: built-in verifiable tasks, R1-format solutions, tokenizer and chat format, token
shards for pretraining, SFT loading and packing, RL prompt loading. Never imports r1core.model.

Exports resolve lazily (PEP 562), so `r1core.data.tasks` (used by the torch-free reward package)
can be imported without pulling in torch through the shard and SFT modules.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "corpus": ["builtin_corpus", "builtin_paragraphs"],
    "jsonl": ["RecordError", "SkipStats"],
    "resumable": ["EpochCursor"],
    "sft": [
        "PackedRow",
        "PackedSFTDataset",
        "SFTDoc",
        "SFTExample",
        "load_problems_jsonl",
        "load_sft_jsonl",
        "pack_row",
        "tokenize_sft",
    ],
    "shards": [
        "IGNORE_INDEX",
        "TokenShardDataset",
        "Window",
        "iter_documents",
        "positions_from_doc_ids",
        "prepare",
        "prepare_shards",
    ],
    "solutions": ["THINK_CLOSE", "THINK_OPEN", "extract_boxed", "pretrain_text", "worked_solution"],
    "tasks": ["TASKS", "Problem", "check_countdown", "difficulty_knobs", "generate", "split_of"],
    "tokenizer": ["ChatFormat", "Tokenizer"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'r1core.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"r1core.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
