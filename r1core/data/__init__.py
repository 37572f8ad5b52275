"""Data layer: built-in verifiable tasks, R1-format solutions, tokenizer and chat format, token
shards for pretraining, SFT loading and packing, RL prompt loading. Never imports r1core.model."""

from r1core.data.corpus import builtin_corpus, builtin_paragraphs
from r1core.data.jsonl import RecordError, SkipStats
from r1core.data.sft import (PackedRow, PackedSFTDataset, SFTDoc, SFTExample, load_problems_jsonl, load_sft_jsonl,
                             pack_row, tokenize_sft)
from r1core.data.shards import (IGNORE_INDEX, TokenShardDataset, Window, iter_documents, positions_from_doc_ids,
                                prepare, prepare_shards)
from r1core.data.solutions import THINK_CLOSE, THINK_OPEN, extract_boxed, pretrain_text, worked_solution
from r1core.data.tasks import TASKS, Problem, check_countdown, difficulty_knobs, generate, split_of
from r1core.data.tokenizer import ChatFormat, Tokenizer

__all__ = [
    "builtin_corpus", "builtin_paragraphs", "RecordError", "SkipStats", "PackedRow", "PackedSFTDataset", "SFTDoc",
    "SFTExample", "load_problems_jsonl", "load_sft_jsonl", "pack_row", "tokenize_sft", "IGNORE_INDEX",
    "TokenShardDataset", "Window", "iter_documents", "positions_from_doc_ids", "prepare", "prepare_shards",
    "THINK_CLOSE", "THINK_OPEN", "extract_boxed", "pretrain_text", "worked_solution", "TASKS", "Problem",
    "check_countdown", "difficulty_knobs", "generate", "split_of", "ChatFormat", "Tokenizer",
]
