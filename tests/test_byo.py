"""Bring your own model and data: a transformers-saved DeepSeek-V3 through `pipeline=r1_zero`, the `load`
stage's checkpoint validation, the data pre-flight over every dataset kind, `+key` typos, Ctrl-C and
resume."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import r1core
from r1core.checkpoint.hf import CheckpointError, check_pretrained, save_pretrained
from r1core.data import Tokenizer
from r1core.pipeline.config import ConfigError
from r1core.pipeline.runner import StageFailed, run_pipeline
from test_pipeline import TOY, _compose

transformers = pytest.importorskip("transformers")

HF_DIMS = dict(
    vocab_size=320,
    hidden_size=48,
    intermediate_size=80,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=2,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    max_position_embeddings=256,
)


def _problems(n, offset=0):
    return [
        {"question": f"{a}+{a + offset}=", "answer": str(2 * a + offset), "task": "arithmetic"}
        for a in range(10, 10 + n)
    ]


def _write_jsonl(path, rows, extra_lines=()):
    path.write_text("\n".join([json.dumps(r) for r in rows] + list(extra_lines)) + "\n")
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random DeepSeek-V3 with its own dims saved by transformers (no MTP weights, config says 1), plus a
    tokenizer.json beside it, as a user brings them."""
    out = tmp_path_factory.mktemp("byo") / "my-model"
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(**HF_DIMS, num_nextn_predict_layers=1)
    transformers.DeepseekV3ForCausalLM(cfg).save_pretrained(out)
    texts = [f"{a}+{b}={a + b} <think> so \\boxed{{{a + b}}}" for a in range(40) for b in range(0, 40, 7)]
    Tokenizer.train_bpe(texts, vocab_size=300).save(out / "tokenizer.json")
    return out


def _byo_cfg(tmp_path, hf_dir, *extra, pipeline="r1_zero"):
    rl = _write_jsonl(tmp_path / "train.jsonl", _problems(30), ["{not json"])  # one bad line of 31: skipped
    ev = _write_jsonl(
        tmp_path / "test.jsonl",
        [
            {"problem": p["question"], "solution": f"\\boxed{{{p['answer']}}}", "task": "arithmetic"}
            for p in _problems(6, offset=3)
        ],
    )
    return _compose(
        [
            f"pipeline={pipeline}",
            f"run_dir={tmp_path / 'run'}",
            *TOY,
            f"hf_checkpoint={hf_dir}",
            f"data.rl_prompts_jsonl={rl}",
            f"data.eval_jsonl={ev}",
            *extra,
        ]
    )


# ---------------------------------------------------------------- bring your own model


def test_transformers_saved_checkpoint_runs_r1_zero_end_to_end_with_its_own_shape_and_tokenizer(
    tmp_path, hf_dir
):
    run_pipeline(_byo_cfg(tmp_path, hf_dir))
    run = tmp_path / "run"
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert {k: s["status"] for k, s in stages.items()} == dict.fromkeys(
        ["prepare", "pretrain", "eval_base", "zero_rl", "eval_zero"], "done"
    )
    assert stages["pretrain"]["outputs"]["model"] == str(hf_dir.resolve())  # loaded, not pretrained
    assert not (run / "stages" / "pretrain" / "checkpoints").exists()
    exported = json.loads((run / "stages" / "zero_rl" / "model" / "config.json").read_text())
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "n_routed_experts",
        "q_lora_rank",
        "kv_lora_rank",
    ):
        assert exported[key] == HF_DIMS[key], key
    assert (
        exported["num_nextn_predict_layers"] == 0
    )  # the checkpoint had no MTP weights; export keeps what it has
    tok = Tokenizer.from_file(run / "stages" / "prepare" / "tokenizer.json")
    assert tok.hash == Tokenizer.from_file(hf_dir).hash
    prepared = (run / "stages" / "prepare" / "rl_prompts.jsonl").read_text().splitlines()
    assert len(prepared) == 30  # the bad line was skipped and counted, not passed on
    assert stages["prepare"]["metrics"] == {"skipped_lines/data.rl_prompts_jsonl": 1}
    assert "shards" not in stages["prepare"]["outputs"]  # nothing pretrains: no corpus is tokenized
    assert {"pass@1", "greedy"} <= set(stages["eval_zero"]["metrics"])


def test_hf_checkpoint_turns_pretrain_into_load_in_every_shipped_pipeline(tmp_path, hf_dir):
    from r1core.pipeline.config import resolve_job_config, to_job

    for name, stage in (("r1_zero", "pretrain"), ("r1", "pretrain"), ("distill", "teacher")):
        cfg = resolve_job_config(_byo_cfg(tmp_path, hf_dir, pipeline=name))
        job = to_job(cfg)
        kinds = {s.name: s.kind.value for s in job.pipeline.stages}
        assert kinds[stage] == "load" and "pretrain" not in kinds.values(), name
        assert (job.model.dim, job.model.n_layers, job.model.n_mtp_modules) == (48, 3, 0)
        assert job.data.tokenizer == str(hf_dir)


def test_from_pretrained_loads_a_transformers_save_without_mtp_and_warns(hf_dir):
    with pytest.warns(UserWarning, match="num_nextn_predict_layers=1 but the checkpoint has no MTP weights"):
        model = r1core.from_pretrained(hf_dir)
    assert model.args.n_mtp_modules == 0 and len(model.mtp) == 0 and model.args.dim == 48
    with pytest.raises(CheckpointError, match=r"lacks .*model\.layers\.3\."):
        r1core.from_pretrained(hf_dir, drop_missing_mtp=False)


def _r1core_checkpoint(out):
    args = r1core.presets["tiny"].replace(vocab_size=320)
    with torch.device("meta"):
        model = r1core.Transformer(args)
    model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    save_pretrained(model, out, max_shard_bytes=300_000)  # several shards
    return sorted(out.glob("model-*.safetensors"))


def test_load_stage_fails_on_a_truncated_shard_naming_the_file(tmp_path, hf_dir):
    ckpt = tmp_path / "ckpt"
    shards = _r1core_checkpoint(ckpt)
    assert len(shards) > 2
    (ckpt / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    victim = shards[1]
    victim.write_bytes(victim.read_bytes()[:-100])
    cfg = _compose(
        [
            "pipeline=r1_zero",
            f"run_dir={tmp_path / 'run'}",
            *TOY,
            f"hf_checkpoint={ckpt}",
            "pipeline.stages=[{name: prepare, kind: prepare}, {name: base, kind: pretrain}]",
        ]
    )
    with pytest.raises(StageFailed, match=rf"^stage 'base' \(load\): {victim}: cannot read safetensors file"):
        run_pipeline(cfg)
    stages = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert stages["prepare"]["status"] == "done" and stages["base"]["status"] == "running"


def test_checkpoint_check_names_a_tensor_of_wrong_shape_or_dtype(tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shard = _r1core_checkpoint(ckpt)[0]
    tensors = load_file(str(shard))
    name = next(n for n in tensors if n.endswith("norm.weight"))
    save_file({**tensors, name: tensors[name].to(torch.int32)}, str(shard))
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor {name} has dtype I32"):
        check_pretrained(ckpt)
    save_file({**tensors, name: tensors[name][:-1]}, str(shard))
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor {name} has shape"):
        check_pretrained(ckpt)


def test_a_bad_hf_checkpoint_is_named_as_such_not_as_a_stage(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cfg = _compose(["pipeline=r1_zero", f"run_dir={tmp_path / 'run'}", f"hf_checkpoint={bad}"])
    with pytest.raises(
        ConfigError,
        match=rf"^hf_checkpoint='{bad}': config.json: model_type='llama' is not "
        "supported",
    ) as e:
        run_pipeline(cfg)
    assert "stage" not in str(e.value)
    cfg = _compose(["pipeline=r1_zero", f"run_dir={tmp_path / 'run'}", "data.eval_jsonl=/nope.jsonl"])
    with pytest.raises(ConfigError, match=r"^data.eval_jsonl='/nope.jsonl' does not exist"):
        run_pipeline(cfg)


# ---------------------------------------------------------------- bring your own data

GOOD = {
    "data.rl_prompts_jsonl": {"prompt": "1+1=", "answer": "2"},
    "data.eval_jsonl": {"problem": "2+2=", "solution": "so \\boxed{4}"},
    "data.cold_start_jsonl": {"prompt": "1+1=", "response": "<think>1+1=2</think> \\boxed{2}"},
    "data.general_prompts_jsonl": {"prompt": "Describe the river."},
    "rejection.non_reasoning_jsonl": {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    },
    "data.pretrain_files": {"text": "a document"},
}
# a line with valid JSON but a missing field, and the reason the pre-flight gives for it
BROKEN = {
    "data.rl_prompts_jsonl": ({"prompt": "1+1="}, "missing field: answer"),
    "data.eval_jsonl": ({"answer": "4"}, "missing field: prompt"),
    "data.cold_start_jsonl": ({"prompt": "1+1="}, "missing field: response"),
    "data.general_prompts_jsonl": ({"answer": "2"}, "missing field: prompt"),
    "rejection.non_reasoning_jsonl": ({"text": "no prompt here"}, "missing field: prompt"),
    "data.pretrain_files": ({"body": "a document"}, "missing field: text"),
}


def _data_cfg(tmp_path, key, n_good, *extra):
    path = _write_jsonl(
        tmp_path / "data.jsonl", [GOOD[key]] * n_good, ['{"prompt": "1+', json.dumps(BROKEN[key][0])]
    )
    value = f"[{path}]" if key == "data.pretrain_files" else str(path)
    return path, _compose(["pipeline=r1_zero", f"run_dir={tmp_path / 'run'}", f"{key}={value}", *extra])


@pytest.mark.parametrize("key", list(GOOD))
def test_preflight_names_file_and_line_of_a_bad_line_in_every_dataset_kind(tmp_path, key):
    path, cfg = _data_cfg(tmp_path, key, 3)
    shown = "data.pretrain_files[0]" if key == "data.pretrain_files" else key
    expected = (
        rf"^{re.escape(shown)}: 2 of 5 lines of {path} are bad \(40.0% > data.max_bad_fraction=0.05; "
        rf"kept 3, skipped 2 \(bad JSON: 1, missing field: 1\)\); first: {path}:4: bad JSON"
    )
    with pytest.raises(ConfigError, match=expected):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "stages").exists()  # before any stage
    _, cfg = _data_cfg(tmp_path, key, 3, "data.strict=true", "data.max_bad_fraction=0.9")
    with pytest.raises(
        ConfigError, match=rf"^{path}:4: bad JSON: .*\(data.strict=true: no bad line is skipped\)"
    ):
        run_pipeline(cfg)


@pytest.mark.parametrize("key", list(GOOD))
def test_preflight_skips_and_counts_bad_lines_under_the_configured_share(tmp_path, key, caplog):
    from r1core.pipeline.config import to_job
    from r1core.pipeline.prepare import data_files
    from r1core.data.preflight import preflight

    path, cfg = _data_cfg(tmp_path, key, 38)
    (stats,) = preflight(data_files(to_job(cfg)), max_bad_fraction=0.05).values()
    assert stats.kept == 38 and dict(stats.skipped) == {"bad JSON": 1, "missing field": 1}
    assert any(f"{path}:40: {BROKEN[key][1]}" in r.getMessage() for r in caplog.records)


def test_rerun_after_a_failed_prepare_does_not_trip_on_its_shards_and_a_done_one_skips_the_preflight(
    tmp_path, monkeypatch
):
    from r1core.pipeline import prepare

    ev = _write_jsonl(tmp_path / "test.jsonl", _problems(4))
    cfg = _compose(
        [
            f"run_dir={tmp_path}",
            *TOY,
            "pipeline.stages=[{name: prepare, kind: prepare}]",
            f"data.eval_jsonl={ev}",
        ]
    )
    real = prepare._general_prompts
    monkeypatch.setattr(prepare, "_general_prompts", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        run_pipeline(cfg)
    assert list((tmp_path / "stages" / "prepare" / "shards").glob("pretrain_*.bin"))
    monkeypatch.setattr(prepare, "_general_prompts", real)
    run_pipeline(cfg)
    assert json.loads((tmp_path / "manifest.json").read_text())["stages"]["prepare"]["status"] == "done"
    ev.write_text("not json\n" * 4)  # a finished prepare is not checked again: a rerun never rereads the data
    run_pipeline(cfg)


# ---------------------------------------------------------------- errors and signals


@pytest.mark.parametrize(
    "override, key",
    [
        ("+foo.bar=1", "foo.bar"),
        ("++rl.stepz=3", "rl.stepz"),
        ("+model.dimm=8", "model.dimm"),
        ("+pipeline.stages.0.initt=x", "pipeline.stages[0].initt"),
    ],
)
def test_plus_prefixed_unknown_key_is_rejected_like_a_plain_one(tmp_path, override, key):
    cfg = _compose(["pipeline=r1_zero", f"run_dir={tmp_path / 'run'}", override])
    with pytest.raises(ConfigError, match="^unknown setting " + re.escape(repr(key))):
        run_pipeline(cfg)
    assert not (tmp_path / "run").exists()


def test_ctrl_c_stops_with_one_line_and_a_rerun_resumes(tmp_path, caplog):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "r1core.cli",
        "run",
        *TOY,
        "pretrain.steps=16",
        "pretrain.save_every=2",
        "pipeline.stages=[{name: prepare, kind: prepare}, {name: pretrain, kind: pretrain}]",
        f"run_dir={run}",
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A shell without job control starts background commands with SIGINT ignored, and Python keeps an ignored
    # SIGINT: give the child the default disposition, as a terminal would, or Ctrl-C is never seen.
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    latest = run / "stages" / "pretrain" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step_000004"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in out + err
    assert "Transformer Engine" not in out + err  # megatron-core's import warnings are filtered
    lines = [x for x in (out + err).splitlines() if "interrupted" in x]
    assert len(lines) == 1 and lines[0].endswith("; rerun the same command to resume"), lines
    step = int(lines[0].split(" at step ")[1].split(";")[0])
    assert step >= 4
    stage = json.loads((run / "manifest.json").read_text())["stages"]["pretrain"]
    assert stage["status"] == "running" and stage["error"] == "interrupted" and stage["seconds"] > 0
    saved = int(latest.read_text().strip().split("_")[1])
    with caplog.at_level(
        logging.INFO, logger="r1core"
    ):  # the same command, in this process (saves a start-up)
        run_pipeline(_compose(cmd[4:-1]))
    assert f"resuming pretrain from step {saved}" in caplog.messages
    again = json.loads((run / "manifest.json").read_text())["stages"]["pretrain"]
    assert again["status"] == "done" and again["attempts"] == 2 and again["seconds"] > stage["seconds"]


def test_manifest_seconds_add_up_every_attempt_including_one_killed_outright(tmp_path, monkeypatch):
    from r1core.pipeline import manifest as manifest_mod
    from r1core.pipeline.manifest import Manifest

    now = [100.0]
    monkeypatch.setattr(manifest_mod.time, "time", lambda: now[0])
    m = Manifest(tmp_path, "p")
    m.start("s", "h")  # attempt 1 starts at 100 ...
    m.fail("s", "interrupted", 10.0)  # ... and is interrupted after 10 s
    now[0] = 200.0
    m.start("s", "h")  # attempt 2 starts at 200 and is killed: no end recorded
    now[0] = 300.0
    m = Manifest(tmp_path, "p")
    m.start("s", "h", last_activity=230.0)  # attempt 3: attempt 2 last wrote progress at 230
    m.finish("s", {}, {}, 5.0)
    st = Manifest(tmp_path, "p").stage("s")
    assert (st["seconds"], st["attempts"], st["status"]) == (10.0 + 30.0 + 5.0, 3, "done")
    m.start("s", "other-hash")  # a changed config starts again from 0
    assert Manifest(tmp_path, "p").stage("s")["seconds"] == 0.0
