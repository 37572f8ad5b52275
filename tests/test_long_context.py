"""Long-context extension: passkey documents, their mix into training, retrieval scoring, and the
rotary settings a long_context stage hands to the stages after it."""

import random
import re
from pathlib import Path

import pytest
import torch

from r1core.checkpoint.hf import save_pretrained
from r1core.data import IGNORE_INDEX, Tokenizer, builtin_corpus
from r1core.data.passkey import PasskeyMix, min_length, passkey_document, passkey_grid
from r1core.model import Transformer
from r1core.model.args import presets
from r1core.pipeline.long_context import passkey_correct, passkey_table, per_length, rope_of


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(builtin_corpus(800, seed=0), vocab_size=400)


def test_passkey_document_has_the_asked_length_and_its_answer_is_the_key(tok):
    rng = random.Random(0)
    for length in (min_length(tok), 80, 133):
        for depth in (0.0, 0.5, 1.0):
            d = passkey_document(tok, length, depth, rng)
            assert len(d.tokens) == length and d.tokens[-1] == tok.eos_id
            assert tok.decode(d.tokens[d.answer_start : d.answer_start + d.answer_len]) == d.key
            text = tok.decode(d.tokens)
            assert text.count(d.key) == 2 and text.endswith(
                f"What is the pass key? The pass key is {d.key}.<|eos|>"
            )


def test_needle_moves_back_with_depth_and_the_grid_is_a_function_of_its_arguments(tok):
    docs = [passkey_document(tok, 200, depth, random.Random(1)) for depth in (0.0, 0.25, 0.5, 0.75, 1.0)]
    where = [tok.decode(d.tokens).index(f"is {d.key}.") for d in docs]
    assert where == sorted(where) and where[0] < where[-1]
    assert all(abs(d.needle_at - d.depth) < 0.2 for d in docs)
    a = passkey_grid(tok, [90, 120], [0.0, 1.0], 3, seed=5)
    b = passkey_grid(tok, [120], [1.0], 3, seed=5)  # a cell holds the same documents whatever else is asked
    assert [d.tokens for d in a[-3:]] == [d.tokens for d in b]
    assert [d.key for d in passkey_grid(tok, [90], [0.0], 3, seed=6)] != [d.key for d in a[:3]]
    with pytest.raises(ValueError, match="at least"):
        passkey_document(tok, min_length(tok) - 10, 0.5, random.Random(0))


class _Rows:
    """A resumable stand-in for WindowBatches: micro-batch i holds tokens i*100 + position."""

    def __init__(self, T=96, B=4):
        self.T, self.B, self.i = T, B, 0

    def __iter__(self):
        while True:
            t = torch.arange(self.T).repeat(self.B, 1) + 100 * self.i
            self.i += 1
            yield {
                "tokens": t,
                "labels": t + 1,
                "doc_ids": torch.zeros_like(t),
                "positions": torch.arange(self.T).repeat(self.B, 1),
            }

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def test_passkey_mix_replaces_a_share_of_rows_with_next_token_documents_and_resumes_exactly(tok):
    mix = PasskeyMix(_Rows(), tok, fraction=0.5, seed=3)
    it = iter(mix)
    batches = [next(it) for _ in range(30)]
    replaced = [
        (mb, r) for mb in batches for r in range(4) if not torch.equal(mb["tokens"][r], mb["labels"][r] - 1)
    ]
    assert 0.3 < len(replaced) / 120 < 0.7
    for mb, r in replaced:
        keep = mb["labels"][r] != IGNORE_INDEX
        n = int(keep.sum())
        assert keep[:n].all() and n >= min_length(tok) - 1  # one document at the row's start, then padding
        assert torch.equal(mb["tokens"][r, 1:n], mb["labels"][r, : n - 1])
        assert (
            mb["labels"][r, n - 1] == tok.eos_id
            and tok.decode(mb["tokens"][r, :n].tolist()).count("pass key") == 3
        )
        assert torch.equal(mb["positions"][r, :n], torch.arange(n)) and (mb["doc_ids"][r, n:] == 1).all()
    lengths = {int((mb["labels"][r] != IGNORE_INDEX).sum()) for mb, r in replaced}
    assert min(lengths) < min_length(tok) + 10 and max(lengths) > 85  # spread over the 96-token row

    resumed = PasskeyMix(_Rows(), tok, fraction=0.5, seed=3)
    it = iter(mix2 := PasskeyMix(_Rows(), tok, fraction=0.5, seed=3))
    for _ in range(10):
        next(it)
    resumed.load_state_dict(mix2.state_dict())
    again = iter(resumed)
    for want in batches[10:20]:
        got = next(again)
        assert all(torch.equal(got[k], want[k]) for k in want)


class _Oracle(torch.nn.Module):
    """Predicts the true next token of each known document, except a digit of the key in `wrong`."""

    def __init__(self, docs, wrong, vocab):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.docs, self.wrong, self.vocab = docs, wrong, vocab

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab)
        for b in range(x.shape[0]):
            d = next(d for d in self.docs if d.tokens == x[b, : len(d.tokens)].tolist())
            nxt = torch.tensor(d.tokens[1:] + [0])
            if id(d) in self.wrong:
                nxt[d.answer_start + 2] = (nxt[d.answer_start + 2] + 1) % self.vocab  # one digit off
            logits[b, torch.arange(len(d.tokens)), nxt] = 1.0
        return logits


def test_retrieval_is_scored_digit_for_digit_and_tabled_per_length_and_depth(tok):
    docs = passkey_grid(tok, [70, 100], [0.0, 1.0], 4, seed=2)
    wrong = {id(d) for i, d in enumerate(docs) if i % 4 == 0 or len(d.tokens) == 100 and d.depth == 1.0}
    correct = passkey_correct(_Oracle(docs, wrong, tok.vocab_size), docs, batch_size=3)
    assert correct == [0.0 if id(d) in wrong else 1.0 for d in docs]
    table = passkey_table(docs, correct)
    cell = {(c["length"], c["depth"]): c for c in table["cells"]}
    assert cell[70, 0.0]["accuracy"] == 0.75 and cell[100, 1.0]["accuracy"] == 0.0
    assert cell[70, 0.0]["se"] == pytest.approx(
        (0.75 / 3 / 4) ** 0.5
    )  # sum of squares 0.75, n - 1 = 3, n = 4
    assert table["by_length"]["100"]["accuracy"] == 3 / 8
    record = {"lengths": [70, 100], "depths": [0.0, 1.0], "per_problem": correct}
    assert per_length(record) == {70: correct[:8], 100: correct[8:]}


def test_rope_settings_round_trip_through_an_exported_model(tmp_path):
    args = presets["tiny"].replace(max_seq_len=320, original_seq_len=64, rope_factor=5.0, beta_fast=16)
    torch.manual_seed(0)
    save_pretrained(Transformer(args), tmp_path / "m")
    rope = rope_of(tmp_path / "m")
    assert rope == {f: getattr(args, f) for f in rope}
    plain = presets["tiny"].replace(max_seq_len=64, original_seq_len=64, rope_factor=1.0)
    save_pretrained(Transformer(plain), tmp_path / "p")
    assert (
        rope_of(tmp_path / "p")["max_seq_len"] == 64
        and not plain.replace(**rope_of(tmp_path / "p")).uses_yarn
    )


def _compose(overrides):
    from hydra import compose, initialize_config_module

    from r1core.pipeline.config import register_configs

    register_configs()
    with initialize_config_module(config_module="r1core.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_a_stage_after_long_context_trains_the_extended_model_and_long_context_sets_its_own(tmp_path):
    from r1core.pipeline.config import StageKind, StageSpec, to_job
    from r1core.pipeline.context import StageContext, make_engine

    job = to_job(_compose(["pipeline=long_context", f"run_dir={tmp_path}"]))
    extended = job.model.replace(rope_factor=5.0, original_seq_len=64, max_seq_len=320)
    torch.manual_seed(0)
    save_pretrained(Transformer(extended), tmp_path / "extended")

    def engine_args(kind, job_model):
        spec = StageSpec(name="s", kind=kind)
        ctx = StageContext(
            spec=spec,
            job=job.__class__(**{**job.__dict__, "model": job_model}),
            stage_dir=tmp_path,
            init_model=str(tmp_path / "extended"),
            dataset=None,
            prepared={},
            device=torch.device("cpu"),
            dtype=torch.float32,
        )
        return make_engine(ctx, 1, 1e-3).model.args

    assert not job.model.uses_yarn
    after = engine_args(StageKind.sft, job.model)  # the job's model is the plain one; the checkpoint's wins
    assert (after.rope_factor, after.original_seq_len, after.max_seq_len) == (5.0, 64, 320)
    phase = job.model.replace(rope_factor=8.0, original_seq_len=64, max_seq_len=512)
    own = engine_args(StageKind.long_context, phase)  # a long_context stage trains under its own settings
    assert (own.rope_factor, own.max_seq_len) == (8.0, 512)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "++pipeline.stages.3.overrides={model.max_seq_len: 64, model.rope_factor: 1.0}",
            "long_context.seq_len=128 exceeds the model's context (model.max_seq_len=64)",
        ),
        ("pipeline.stages.5.baseline=pretrain", "baseline='pretrain' must name an earlier stage of its kind"),
    ],
)
def test_long_context_config_errors_name_the_stage_before_any_work(tmp_path, override, message):
    from r1core.pipeline.config import ConfigError, to_job, validate_pipeline

    cfg = _compose(["pipeline=long_context", f"run_dir={tmp_path}", override])
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_pipeline(cfg, to_job(cfg))
    assert not any(tmp_path.iterdir())


def test_extending_a_loaded_checkpoint_prepares_the_corpus_its_long_context_stages_train_on(tmp_path):
    """With hf_checkpoint set, pretraining becomes a load stage and needs no corpus, but a long_context stage
    still trains on it: prepare tokenizes it whenever the pipeline has one."""
    from r1core.pipeline.config import resolve_job_config, to_job
    from r1core.pipeline.prepare import run_prepare

    ckpt = tmp_path / "ckpt"
    save_pretrained(Transformer(presets["tiny"].replace(max_seq_len=64, rope_factor=1.0)), ckpt)
    Tokenizer.train_bpe(builtin_corpus(200, seed=0), vocab_size=300).save(ckpt / "tokenizer.json")
    for pipeline, shards in (("long_context", True), ("r1_zero", False)):
        cfg = _compose([f"pipeline={pipeline}", f"run_dir={tmp_path}", f"hf_checkpoint={ckpt}"])
        job = to_job(resolve_job_config(cfg))
        job.data.corpus_docs = 300
        assert "pretrain" not in {s.kind.value for s in job.pipeline.stages}, pipeline
        out = run_prepare(job, tmp_path / pipeline)
        assert ("shards" in out) == shards, pipeline


FIXTURE_BASE = Path(__file__).parent / "fixtures" / "passkey_base"  # see its README: 3000 steps at 64 tokens


def test_the_recipe_extends_a_base_that_retrieves_at_its_context_to_retrieve_at_four_times_it(tmp_path):
    """The recipe's two YaRN phases (64 -> 128 -> 256 tokens, s = 5) on a tiny base that retrieves the key at
    its own 64 tokens: at 256 tokens the extended model retrieves more keys than the unextended one, by more
    than two standard errors of the paired difference over the same 500 documents."""
    import json

    from r1core.pipeline.runner import run_pipeline
    from r1core.rl.stats import paired_difference

    cfg = _compose(
        [
            "pipeline=long_context",
            f"run_dir={tmp_path}",
            f"hf_checkpoint={FIXTURE_BASE}",
            "passkey.lengths=[256]",
            "passkey.per_cell=100",
        ]
    )
    run_pipeline(cfg)
    base, long = (
        per_length(json.loads((tmp_path / "stages" / s / "passkey.json").read_text()))[256]
        for s in ("passkey_base", "passkey_long")
    )
    assert sum(base) / len(base) < 0.05  # plain RoPE beyond its context: about no key
    gain = paired_difference(base, long)
    assert gain.mean > 2 * gain.se, (gain.mean, gain.se)
