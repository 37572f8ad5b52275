"""Token shards: tokenize a corpus once into memory-mapped files, then read training windows.

On disk, per shard:
    {name}_{k:05d}.bin   raw token ids (uint16 when the vocabulary fits, else uint32), each
                         document followed by EOS
    {name}_{k:05d}.json  index: dtype, n_tokens, doc_ends (exclusive end offsets), tokenizer hash
The .json is the commit marker. Everything is staged under temporary names and renamed only after
the whole corpus went through, so a failed run leaves no partial shard behind.

TokenShardDataset reads windows of seq_len tokens with next-token labels. Windows step by seq_len
over each shard (so every token but a shard's first is a target once per epoch), are shuffled per
epoch by (seed, epoch), split across data-parallel ranks, and the position is a two-integer state
that resumes exactly.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from r1core.data.jsonl import SkipStats, iter_records, pick_string, require_object
from r1core.data.resumable import EpochCursor
from r1core.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FORMAT = "r1core.token_shard.v1"


class Window(NamedTuple):
    tokens: torch.Tensor  # [T] int64
    labels: torch.Tensor  # [T] int64, next token; IGNORE_INDEX where it would cross a document end
    doc_ids: torch.Tensor  # [T] int64, 0 for the window's first document, +1 at each new one


def iter_documents(
    paths: Iterable[str | Path], field: str = "text", stats: SkipStats | None = None
) -> Iterator[str]:
    """Documents of .jsonl files (string `field` of each record) or text files (one per non-empty line)."""
    stats = stats if stats is not None else SkipStats()

    def parse(obj):
        return pick_string(require_object(obj), (field,), f"text field {field!r}")

    for path in map(Path, paths):
        if path.suffix in (".jsonl", ".json"):
            for _, text in iter_records(path, parse, stats):
                yield text
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from (line.rstrip("\n") for line in f if line.strip())


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class _ShardWriter:
    """Stages shards under temporary names; commit() renames them all, abort() deletes them."""

    def __init__(self, out_dir: Path, name: str, tok: Tokenizer, max_tokens: int):
        self.out_dir, self.name, self.max_tokens = out_dir, name, max_tokens
        self.dtype = shard_dtype(tok.vocab_size)
        self.meta = {
            "format": FORMAT,
            "dtype": self.dtype.name,
            "tokenizer_hash": tok.hash,
            "eos_id": tok.eos_id,
            "vocab_size": tok.vocab_size,
        }
        self.staged: list[tuple[Path, Path, dict]] = []  # (tmp bin, final stem, index)
        self._file = None

    def _open(self) -> None:
        stem = self.out_dir / f"{self.name}_{len(self.staged):05d}"
        tmp = self.out_dir / f".{stem.name}.bin.tmp-{os.getpid()}"
        self._file = open(tmp, "wb")
        self.staged.append((tmp, stem, {**self.meta, "n_tokens": 0, "doc_ends": []}))

    def add(self, ids: list[int]) -> None:
        index = self.staged[-1][2] if self._file else None
        if index is None or (index["doc_ends"] and index["n_tokens"] + len(ids) > self.max_tokens):
            self._close()
            self._open()
            index = self.staged[-1][2]
        self._file.write(np.asarray(ids, dtype=self.dtype).tobytes())
        index["n_tokens"] += len(ids)
        index["doc_ends"].append(index["n_tokens"])

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def commit(self) -> list[Path]:
        self._close()
        for tmp, stem, index in self.staged:
            tmp.replace(stem.with_suffix(".bin"))
            index_tmp = tmp.with_name(tmp.name + ".json")
            index_tmp.write_text(json.dumps(index), encoding="utf-8")
            index_tmp.replace(stem.with_suffix(".json"))  # the index appears last: it marks a complete shard
        return [stem.with_suffix(".bin") for _, stem, _ in self.staged]

    def abort(self) -> None:
        self._close()
        for tmp, _, _ in self.staged:
            tmp.unlink(missing_ok=True)


def prepare_shards(
    docs: Iterable[str],
    out_dir: str | Path,
    tokenizer: Tokenizer,
    name: str = "shard",
    max_shard_tokens: int = 1 << 28,
    batch_docs: int = 512,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Tokenize `docs` into shards under out_dir (EOS after every document); returns the .bin paths.

    Documents never straddle shards; a shard closes before the document that would push it past
    max_shard_tokens. Empty documents are skipped and counted.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    old = sorted(out_dir.glob(f"{name}_*.json")) + sorted(out_dir.glob(f"{name}_*.bin"))
    if old and not overwrite:
        raise FileExistsError(f"{out_dir} already holds shards named {name}_* (pass overwrite=True)")
    writer = _ShardWriter(out_dir, name, tokenizer, max_shard_tokens)
    eos, n_empty, n_tokens = tokenizer.eos_id, 0, 0
    total = len(docs) if hasattr(docs, "__len__") else None  # with a total, tqdm shows an ETA
    bar = tqdm(desc=f"tokenize -> {out_dir}", total=total, unit="doc", disable=not progress, mininterval=1.0)
    try:
        batch: list[str] = []
        for doc in _chain_end(docs):
            if doc is not None:
                batch.append(doc)
            if batch and (doc is None or len(batch) >= batch_docs):
                for ids in tokenizer.encode_batch(batch):
                    if not ids:
                        n_empty += 1
                        continue
                    writer.add(ids + [eos])
                    n_tokens += len(ids) + 1
                bar.update(len(batch))
                bar.set_postfix(tokens=n_tokens, refresh=False)
                batch = []
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if not writer.staged:
        raise ValueError(f"no non-empty document to write to {out_dir}")
    for path in old:
        path.unlink()
    paths = writer.commit()
    log.info(
        "wrote %d shards, %d tokens to %s (%d empty documents skipped)",
        len(paths),
        n_tokens,
        out_dir,
        n_empty,
    )
    return paths


def _chain_end(docs: Iterable[str]) -> Iterator[str | None]:
    """docs followed by one None, so the batching loop flushes its last partial batch."""
    yield from docs
    yield None


def prepare(
    paths: Iterable[str | Path], out_dir: str | Path, tokenizer: Tokenizer, field: str = "text", **kwargs
) -> list[Path]:
    """prepare_shards over the documents of JSONL / text files (see iter_documents)."""
    stats = SkipStats()
    out = prepare_shards(iter_documents(list(paths), field, stats), out_dir, tokenizer, **kwargs)
    if stats.n_skipped:
        log.warning("prepare: %s", stats.summary())
    return out


class _Shard(NamedTuple):
    tokens: np.memmap
    doc_ends: np.ndarray
    n_windows: int


def _load_shards(path: str | Path | list, seq_len: int, tokenizer_hash: str | None) -> list[_Shard]:
    paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
    indexes: list[Path] = []
    for p in paths:
        # Names starting with "." are another prepare's staging files.
        indexes += (
            sorted(q for q in p.glob("*.json") if not q.name.startswith("."))
            if p.is_dir()
            else [p.with_suffix(".json")]
        )
    shards = []
    for index_path in indexes:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if index.get("format") != FORMAT:
            continue  # other JSON files in the directory
        if tokenizer_hash is not None and index["tokenizer_hash"] != tokenizer_hash:
            raise ValueError(
                f"{index_path} was tokenized with a different tokenizer "
                f"({index['tokenizer_hash'][:12]} != {tokenizer_hash[:12]})"
            )
        tokens = np.memmap(index_path.with_suffix(".bin"), dtype=np.dtype(index["dtype"]), mode="r")
        if tokens.shape[0] != index["n_tokens"]:
            raise ValueError(
                f"{index_path.with_suffix('.bin')} holds {tokens.shape[0]} tokens, "
                f"index says {index['n_tokens']}"
            )
        shards.append(
            _Shard(tokens, np.asarray(index["doc_ends"], dtype=np.int64), (index["n_tokens"] - 1) // seq_len)
        )
    if not shards:
        raise FileNotFoundError(f"no token shard index (*.json, format {FORMAT}) under {path}")
    return shards


class TokenShardDataset(EpochCursor):
    """Fixed-length training windows over token shards; resumable and split across DP ranks.

    Each epoch visits every window of this rank once, in an order fixed by (seed, epoch). Every
    rank gets the same number of windows (the remainder of the permutation is dropped), so data-
    parallel ranks never disagree on the number of steps.
    """

    def __init__(
        self,
        path: str | Path | list,
        seq_len: int,
        seed: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        shuffle: bool = True,
        loop: bool = True,
        tokenizer_hash: str | None = None,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        self.seq_len, self.seed, self.shuffle, self.loop = seq_len, seed, shuffle, loop
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._shards = _load_shards(path, seq_len, tokenizer_hash)
        self._first = np.cumsum(
            [0] + [s.n_windows for s in self._shards]
        )  # global index of each shard's window 0
        self.n_windows = int(self._first[-1])
        self.per_rank = self.n_windows // dp_size
        if self.per_rank == 0:
            raise ValueError(f"{self.n_windows} windows of {seq_len + 1} tokens cannot feed {dp_size} ranks")
        self.epoch, self.pos = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.per_rank

    def order(self, epoch: int) -> np.ndarray:
        """Global window indices this rank reads in `epoch`, in reading order."""
        if epoch != self._order_epoch:
            perm = (
                np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
                if self.shuffle
                else np.arange(self.n_windows)
            )
            self._order = perm[: self.per_rank * self.dp_size][self.dp_rank :: self.dp_size]
            self._order_epoch = epoch
        return self._order

    def window(self, g: int) -> Window:
        s = int(np.searchsorted(self._first, g, side="right")) - 1
        shard = self._shards[s]
        start = (g - int(self._first[s])) * self.seq_len
        x = torch.from_numpy(shard.tokens[start : start + self.seq_len + 1].astype(np.int64))  # [T+1]
        pos = np.arange(start, start + self.seq_len)
        doc = np.searchsorted(shard.doc_ends, pos, side="right")  # [T] document of each token
        labels = x[1:].clone()
        labels[torch.from_numpy(pos + 1 == shard.doc_ends[doc])] = IGNORE_INDEX  # last token of a document
        return Window(x[:-1], labels, torch.from_numpy(doc - doc[0]))

    def __iter__(self) -> Iterator[Window]:
        return (self.window(g) for g in self.walk())

    def identity(self) -> dict:
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "n_windows": self.n_windows,
        }


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 wherever the document id changes along the last dim: [..., T] -> [..., T]."""
    T = doc_ids.shape[-1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    change = torch.ones_like(doc_ids, dtype=torch.bool)
    change[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    start = (
        torch.where(change, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    )  # index where each token's doc began
    return idx - start
