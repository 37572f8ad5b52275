"""Tokenizer (HF `tokenizers`) and the chat format that turns a user prompt into model input.

Our own tokenizer is byte-level BPE with every digit its own token: numbers then have one spelling
per digit sequence, which is what makes column arithmetic learnable by a small model (BPE merges
like "35" would give 47 and 35 unrelated embeddings). `<think>` and `</think>` are single,
non-special tokens (as in DeepSeek-R1's tokenizer), so they survive decode(skip_special=True).

Two chat templates are known, chosen from the tokenizer's vocabulary:
    r1core    <|bos|>{system}<|user|>{prompt}<|assistant|><think>\\n  ... <|eos|>
    deepseek  <｜begin▁of▁sentence｜>{system}<｜User｜>{prompt}<｜Assistant｜><think>\\n
              ... <｜end▁of▁sentence｜>
The trailing "<think>\\n" is R1's forced start of the reasoning; ChatFormat.think_prefix sets it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from r1core.data.solutions import THINK_CLOSE, THINK_OPEN

# name -> token text, per known template.
TEMPLATES: dict[str, dict[str, str]] = {
    "r1core": {
        "bos": "<|bos|>",
        "eos": "<|eos|>",
        "pad": "<|pad|>",
        "user": "<|user|>",
        "assistant": "<|assistant|>",
    },
    "deepseek": {
        "bos": "<｜begin▁of▁sentence｜>",
        "eos": "<｜end▁of▁sentence｜>",
        "pad": "<｜▁pad▁｜>",
        "user": "<｜User｜>",
        "assistant": "<｜Assistant｜>",
    },
}
SPECIAL_TOKENS = tuple(TEMPLATES["r1core"].values())


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` that knows its special tokens and template."""

    def __init__(self, tok: tokenizers.Tokenizer, overrides: dict[str, str] | None = None):
        self._tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        self.style = next(
            (s for s, t in TEMPLATES.items() if t["user"] in vocab and t["assistant"] in vocab), "plain"
        )
        names = dict(TEMPLATES.get(self.style, {}))
        names.update(overrides or {})
        if names.get("pad") not in vocab and "eos" in names:
            names["pad"] = names["eos"]  # DeepSeek-style vocabularies may lack a pad token
        self.special_tokens = {k: v for k, v in names.items() if v in vocab}

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def train_bpe(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: Iterable[str] = SPECIAL_TOKENS,
        added_tokens: Iterable[str] = (THINK_OPEN, THINK_CLOSE),
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> "Tokenizer":
        """Byte-level BPE with individual digits; the result has exactly `vocab_size` ids."""
        special_tokens, added_tokens = list(special_tokens), list(added_tokens)
        n_bpe = vocab_size - len(added_tokens)
        if n_bpe < 256 + len(special_tokens):
            raise ValueError(
                f"vocab_size {vocab_size} leaves no room beyond the 256 bytes, "
                f"{len(special_tokens)} special and {len(added_tokens)} added tokens"
            )
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=n_bpe,
            min_frequency=min_frequency,
            special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load a tokenizer.json (or a directory holding one, e.g. a DeepSeek release).

        For templates we do not know, bos/eos/pad come from a tokenizer_config.json beside it.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        return cls(
            tokenizers.Tokenizer.from_file(str(path)), _config_specials(path.parent / "tokenizer_config.json")
        )

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self._tok.to_str(), encoding="utf-8")
        tmp.replace(path)

    # -- use ----------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        # add_special_tokens=False: a released tokenizer's post-processor may add BOS on its own;
        # callers say explicitly what they want.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _special_id(self, name: str) -> int:
        if name not in self.special_tokens:
            raise KeyError(f"tokenizer ({self.style}) has no {name} token; known: {self.special_tokens}")
        return self._tok.token_to_id(self.special_tokens[name])

    @property
    def bos_id(self) -> int:
        return self._special_id("bos")

    @property
    def eos_id(self) -> int:
        return self._special_id("eos")

    @property
    def pad_id(self) -> int:
        return self._special_id("pad")

    @property
    def hash(self) -> str:
        """SHA-256 of the serialized tokenizer: token shards record it to catch mismatches."""
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok


def _config_specials(config_path: Path) -> dict[str, str]:
    if not config_path.is_file():
        return {}
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    out = {}
    for name in ("bos", "eos", "pad"):
        value = cfg.get(f"{name}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


@dataclass
class ChatFormat:
    """Renders prompts for a chat template and knows where the assistant's turn starts and stops."""

    bos: str
    user: str
    assistant: str
    eos: str
    stop_ids: tuple[int, ...]
    think_prefix: str = THINK_OPEN + "\n"
    system: str = ""

    @classmethod
    def for_tokenizer(
        cls, tok: Tokenizer, think_prefix: str = THINK_OPEN + "\n", system: str = ""
    ) -> "ChatFormat":
        if tok.style not in TEMPLATES:
            raise ValueError(
                "tokenizer has neither the r1core nor the DeepSeek chat tokens "
                f"({', '.join(TEMPLATES['r1core'].values())} / {', '.join(TEMPLATES['deepseek'].values())})"
            )
        t = tok.special_tokens
        return cls(
            bos=t["bos"],
            user=t["user"],
            assistant=t["assistant"],
            eos=t["eos"],
            stop_ids=(tok.eos_id,),
            think_prefix=think_prefix,
            system=system,
        )

    @property
    def assistant_prefix(self) -> str:
        """What the assistant's turn starts with; generation continues after it."""
        return self.assistant + self.think_prefix

    def render_prompt(self, prompt: str, system: str | None = None) -> str:
        system = self.system if system is None else system
        return f"{self.bos}{system}{self.user}{prompt}{self.assistant_prefix}"

    def strip_think_prefix(self, response: str) -> str:
        """The response without the part the prompt already supplies (SFT data often repeats
        "<think>\\n"); also accepts "<think>" followed by other whitespace."""
        if self.think_prefix and response.startswith(self.think_prefix):
            return response[len(self.think_prefix) :]
        stripped = self.think_prefix.strip()
        if stripped and response.startswith(stripped):
            return response[len(stripped) :].lstrip()
        return response

    def full_response(self, generated: str) -> str:
        """Generated continuation with the forced prefix put back, as reward functions expect."""
        return self.think_prefix + generated
