"""The pretraining stages' validation loss: held-out documents, the CE over them, when it is logged."""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from r1core.checkpoint.hf import from_pretrained
from r1core.data import TokenShardDataset
from r1core.data.shards import positions_from_doc_ids
from r1core.data.tokenizer import Tokenizer
from r1core.model.transformer import IGNORE_INDEX
from r1core.data import ChatFormat
from r1core.pipeline import prepare
from r1core.pipeline.config import to_job
from r1core.pipeline.runner import run_pipeline
from test_pipeline import TOY, _compose

STAGES = "pipeline.stages=[{name: prepare, kind: prepare}, {name: pretrain, kind: pretrain}]"


def _run(tmp_path, *extra):
    cfg = _compose([f"run_dir={tmp_path}", *TOY, STAGES, "pretrain.steps=7", "pretrain.eval_every=3", *extra])
    run_pipeline(cfg)
    return json.loads((tmp_path / "manifest.json").read_text())["stages"]


def test_validation_ce_is_the_final_models_ce_on_held_out_test_split_documents(tmp_path, monkeypatch):
    written = {}
    real = prepare.prepare_shards

    def keep_docs(docs, out_dir, tok, name="shard", **kw):
        written[name] = list(docs)
        return real(written[name], out_dir, tok, name=name, **kw)

    monkeypatch.setattr(prepare, "prepare_shards", keep_docs)
    stages = _run(tmp_path, "data.val_docs=64", "pretrain.eval_batches=2")

    # held out: documents on test-split problems, none of whose prompts the training corpus holds
    def prompts(docs):
        return {d.split("<|assistant|>")[0] for d in docs if "<|assistant|>" in d}

    assert len(written["val"]) == 64 and len(prompts(written["val"])) > 20
    assert len(prompts(written["pretrain"])) > 100 and not prompts(written["val"]) & prompts(
        written["pretrain"]
    )
    rows = [json.loads(x) for x in (tmp_path / "stages/pretrain/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_ce" in r] == [3, 6, 7]  # every eval_every steps and the last
    # the last one is the exported model's next-token CE over the first 2 micro-batches of held-out windows
    val = Path(stages["prepare"]["outputs"]["val_shards"])
    tok = Tokenizer.from_file(stages["prepare"]["outputs"]["tokenizer"])
    ds = TokenShardDataset(val, 48, shuffle=False, loop=False, tokenizer_hash=tok.hash)
    rows16 = list(ds)[:16]  # micro_batch_size 8, eval_batches 2
    model = from_pretrained(stages["pretrain"]["outputs"]["model"])
    tokens, labels, doc_ids = (
        torch.stack([getattr(r, f) for r in rows16]) for f in ("tokens", "labels", "doc_ids")
    )
    with torch.no_grad():
        logits = model(tokens, positions_from_doc_ids(doc_ids), doc_ids)
    expected = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert abs(rows[-1]["val_ce"] - expected.item()) < 1e-4, (rows[-1]["val_ce"], expected.item())
    assert stages["pretrain"]["metrics"]["val_ce"] == rows[-1]["val_ce"]


def test_user_pretraining_files_get_validation_only_from_val_files(tmp_path):
    lines = [json.dumps({"text": f"document {i}: {i} plus {i} is {2 * i}."}) for i in range(300)]
    corpus, held = tmp_path / "corpus.jsonl", tmp_path / "held.jsonl"
    corpus.write_text("\n".join(lines[:250]) + "\n")
    held.write_text("\n".join(lines[250:]) + "\n")
    stages = _run(tmp_path / "run", f"data.pretrain_files=[{corpus}]", f"data.val_files=[{held}]")
    assert stages["pretrain"]["metrics"]["val_ce"] > 0
    # the held-out windows are val_files' documents, not the corpus's
    tok = Tokenizer.from_file(stages["prepare"]["outputs"]["tokenizer"])
    ds = TokenShardDataset(stages["prepare"]["outputs"]["val_shards"], 48, shuffle=False, loop=False)
    text = tok.decode(torch.cat([w.tokens for w in ds]).tolist())
    assert "document 250:" in text and "document 249:" not in text
    # without val_files, user pretraining files get no validation (nothing of theirs is held out silently)
    job = to_job(_compose([f"run_dir={tmp_path / 'x'}", *TOY, f"data.pretrain_files=[{corpus}]"]))
    assert prepare._val_shards(job, tmp_path / "x", tok, ChatFormat.for_tokenizer(tok), {}) is None


def test_held_out_data_too_short_for_one_window_is_a_logged_skip(tmp_path, caplog):
    stages = _run(tmp_path, "data.val_docs=1")  # one ~20-token document, windows of 49 tokens
    assert "val_ce" not in stages["pretrain"]["metrics"] and stages["pretrain"]["status"] == "done"
    assert any("stage pretrain: no validation loss" in r.getMessage() for r in caplog.records)


def test_tokens_per_s_counts_training_time_only(tmp_path, monkeypatch):
    """A validation pass between two logged rows does not lower the logged training throughput."""
    from r1core.train import lm

    clock = [0.0]
    monkeypatch.setattr(lm.time, "perf_counter", lambda: clock[0])

    class Engine:  # each step takes 1 s for 100 tokens; a validation pass takes 50 s
        def train_step(self, micro, objective):
            clock[0] += 1.0
            return {"loss": 1.0, "n_tokens": 100}

        def forward_only(self, batches, fn):
            clock[0] += 50.0
            return [(2.0, 4.0)]

        def sum_over_ranks(self, values):
            return values

    class Data(list):
        def state_dict(self):
            return {}

    cfg = lm.LMTrainConfig(
        steps=6, log_every=2, eval_every=3, save_every=1000, micro_batch_size=1, batch_size=1
    )
    lm.train_lm(Engine(), Data([{}] * 6), cfg, tmp_path, objective=None, is_main=True, val_batches=[{}])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("val_ce")) for r in rows] == [(2, None), (3, 0.5), (4, None), (6, 0.5)]
    assert [r["tokens_per_s"] for r in rows] == [100.0] * 4
