"""The R1 pipeline: config validation, stage wiring, resume after a kill, filters and eval metrics."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from safetensors.torch import load_file

from r1core.data import Problem
from r1core.pipeline.config import ConfigError, register_configs, to_job, validate_pipeline
from r1core.pipeline.manifest import Manifest
from r1core.pipeline.rejection import Filters, max_ngram_repeats, rejection_reason
from r1core.pipeline.runner import run_pipeline
from r1core.rl.evaluate import EvalConfig, evaluate, final_answer, majority_correct
from r1core.rl.rewarding import Scorer
from r1core.rollout import Sample

# Step counts small enough for CI; every stage still trains, samples, filters and evaluates.
TOY = [
    "pretrain.steps=6",
    "pretrain.save_every=3",
    "pretrain.seq_len=48",
    "pretrain.batch_size=8",
    "pretrain.micro_batch_size=8",
    "sft.steps=3",
    "sft.save_every=2",
    "sft.seq_len=64",
    "sft.batch_size=8",
    "sft.micro_batch_size=8",
    "rl.steps=2",
    "rl.save_every=1",
    "rl.prompts_per_step=3",
    "rl.group_size=2",
    "rl.sampling.max_new_tokens=12",
    "rl.max_refill_rounds=0",
    "eval.problems=4",
    "eval.k=2",
    "eval.sampling.max_new_tokens=12",
    "rejection.prompts=4",
    "rejection.samples_per_prompt=2",
    "rejection.sampling.max_new_tokens=12",
    "rejection.filters.require_correct=false",
    "rejection.filters.require_format=false",
    "rejection.filters.require_finished=false",
    "distill.prompts=4",
    "distill.sampling.max_new_tokens=12",
    "distill.filters.require_correct=false",
    "distill.filters.require_finished=false",
    "data.corpus_docs=300",
    "data.cold_start_examples=40",
    "data.eval_problems=4",
]


def _compose(overrides):
    register_configs()
    with initialize_config_module(config_module="r1core.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _cfg(tmp_path, *extra, pipeline="default"):
    return _compose([f"pipeline={pipeline}", f"run_dir={tmp_path}", *TOY, *extra])


def _toy_stages(pipeline="default"):
    """The shipped pipeline's stages as one `pipeline.stages=` override, with the step counts its stages set
    for themselves dropped so TOY's apply (the default's distill stage alone trains 250 steps, 44 s of a toy
    run's 66 s of stages); kinds, inits, datasets, baselines and every other stage setting are kept."""
    import importlib.resources

    path = importlib.resources.files("r1core.conf") / "pipeline" / f"{pipeline}.yaml"
    stages = OmegaConf.to_container(OmegaConf.load(str(path)).pipeline.stages)

    def fmt(d):
        return "{" + ", ".join(f"{k}: {fmt(v) if isinstance(v, dict) else v}" for k, v in d.items()) + "}"

    for stage in stages:
        overrides = {k: v for k, v in stage.pop("overrides", {}).items() if not k.endswith(".steps")}
        if overrides:
            stage["overrides"] = overrides
    return "pipeline.stages=[" + ", ".join(fmt(stage) for stage in stages) + "]"


def test_toy_stages_keep_the_shipped_stages_but_their_step_counts():
    shipped = OmegaConf.to_container(_compose(["pipeline=default", "run_dir=/tmp/unused"]).pipeline.stages)
    toy = OmegaConf.to_container(_compose(["run_dir=/tmp/unused", _toy_stages()]).pipeline.stages)
    for stage in shipped:
        stage["overrides"] = {k: v for k, v in stage["overrides"].items() if not k.endswith(".steps")}
    assert toy == shipped


# ---------------------------------------------------------------- validation before any work


@pytest.mark.parametrize(
    "override, message",
    [
        ("rl.group_size=1", "rl.group_size=1"),
        ("parallel.tp=3", "incompatible parallel layout"),
        (
            "data.rl_prompts_jsonl=/nope/problems.jsonl",
            "data.rl_prompts_jsonl='/nope/problems.jsonl' does not exist",
        ),
        (
            "+pipeline.stages.1.overrides={rl.no_such_key: 1}",
            "override key 'rl.no_such_key' is not a job setting",
        ),
        ("pipeline.stages.3.init=eval_zero", "init='eval_zero' names no earlier stage"),
        ("data.val_docs=-1", "data.val_docs=-1 must be >= 0"),
        ("pretrain.eval_every=-1", "eval_every=-1 must be >= 0"),
        (
            "sft.eval_every=50",
            "stage 'cold_start_sft': sft.eval_every=50, but cold_start_sft stages have no held-out",
        ),
        (
            "pipeline.stages.14.overrides={distill.student_init: nowhere}",
            "distill.student_init='nowhere' names no earlier stage",
        ),
        (
            "pipeline.stages.14.overrides={distill.student_init: eval_base}",
            "distill.student_init='eval_base' is a eval stage: no model",
        ),
    ],
)
def test_config_errors_fail_before_any_work_with_one_clear_message(tmp_path, override, message):
    cfg = _cfg(tmp_path / "run", override)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        run_pipeline(cfg)
    assert not (tmp_path / "run").exists()


def test_unknown_stage_kind_is_rejected_at_compose_time(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="pipeline.stages.1.kind=pretraining"):
        _cfg(tmp_path, "pipeline.stages.1.kind=pretraining")


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "r1core.cli",
            "run",
            f"run_dir={tmp_path}/x",
            f"hydra.run.dir={tmp_path}/x",
            "rl.group_size=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "rl.group_size=1" in r.stderr + r.stdout and "Traceback" not in r.stderr


def test_every_shipped_pipeline_validates():
    for name in ("default", "r1", "r1_zero", "distill"):
        cfg = _compose([f"pipeline={name}", "run_dir=/tmp/unused"])
        stages = validate_pipeline(cfg, to_job(cfg))
        assert stages[0][0].kind.value == "prepare"


def test_every_stage_validates_under_several_processes_and_a_student_that_does_not_fit_is_named(tmp_path):
    cfg = _cfg(tmp_path)
    assert len(validate_pipeline(cfg, to_job(cfg), world_size=2)) == 16
    cfg = _cfg(tmp_path, "parallel.tp=2", "distill.student.n_heads=3")
    with pytest.raises(
        ConfigError, match=r"stage 'distill': the student \(distill.student\) does not fit .*n_heads=3"
    ):
        validate_pipeline(cfg, to_job(cfg), world_size=2)


def test_a_per_sequence_rl_loss_under_context_parallelism_is_refused_before_any_work(tmp_path):
    cfg = _cfg(tmp_path, "parallel.cp=2", "rl.loss.agg=seq_mean_token_mean")
    message = r"stage 'zero_rl': rl.loss.agg=seq_mean_token_mean .*parallel.cp=2"
    with pytest.raises(ConfigError, match=message):
        validate_pipeline(cfg, to_job(cfg), world_size=2)
    cfg = _cfg(tmp_path, "parallel.cp=2", "rl.loss.agg=token_mean")  # a token sum splits exactly
    assert len(validate_pipeline(cfg, to_job(cfg), world_size=2)) == 16


def test_stage_overrides_apply_to_that_stage_only(tmp_path):
    def rl_steps(*extra):
        cfg = _cfg(tmp_path, *extra)
        return {spec.name: job.rl.steps for spec, job in validate_pipeline(cfg, to_job(cfg))}

    before, after = rl_steps(), rl_steps("+pipeline.stages.3.overrides={rl.steps: 7}")
    assert after["zero_rl"] == 7 and before["zero_rl"] != 7
    assert {k: v for k, v in after.items() if k != "zero_rl"} == {
        k: v for k, v in before.items() if k != "zero_rl"
    }


# ---------------------------------------------------------------- eval metrics and filters


def test_majority_vote_hand_cases():
    assert majority_correct(["4", "5", "4"], [1, 0, 1]) == 1.0
    assert majority_correct(["5", "4", "5"], [0, 1, 0]) == 0.0
    assert majority_correct(["4", "5"], [1, 0]) == 1.0  # tie: the first seen
    assert majority_correct([None, None], [0, 0]) == 0.0
    assert final_answer("<think>2+2</think> \\boxed{ 4 }") == "4"
    assert final_answer("<think>never closed \\boxed{4}") is None


class CannedRollout:
    """Returns fixed responses in the order a real engine would (prompt-major, n per prompt)."""

    def __init__(self, responses):
        self.responses = responses

    def generate(self, prompts, n, sampling):
        out = []
        for i, _ in enumerate(prompts):
            texts = self.responses[i][:n] if sampling.temperature > 0 else self.responses[i][-1:]
            out += [
                Sample(
                    prompt_ids=[1],
                    response_ids=[2],
                    logprobs=[0.0],
                    finish_reason="stop",
                    prompt_index=i,
                    sample_index=j,
                    response_text=t,
                )
                for j, t in enumerate(texts)
            ]
        return out


def test_eval_pass_at_1_and_cons_at_k_hand_computed():
    probs = [
        Problem(prompt="1+1=", answer="2", task="arithmetic"),
        Problem(prompt="2+2=", answer="4", task="arithmetic"),
    ]
    box = lambda x: f"<think>x</think> \\boxed{{{x}}}"  # noqa: E731
    rollout = CannedRollout(
        [
            [box(2), box(3), box(3), box(2)],  # 1 of 3 sampled right, greedy (last) right
            [box(4), box(4), box(5), box(9)],
        ]
    )  # 2 of 3 right, greedy wrong
    metrics, rows = evaluate(rollout, lambda p: [0], probs, EvalConfig(k=3), seed=0)
    assert metrics["pass@1"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert metrics["cons@3"] == pytest.approx(0.5)  # problem 1 votes 3 (wrong), problem 2 votes 4
    assert metrics["greedy"] == pytest.approx(0.5)
    assert [r["cons"] for r in rows] == [0.0, 1.0]


def _sample(text, ids=(5, 6, 7), finish="stop"):
    return Sample(
        prompt_ids=[1],
        response_ids=list(ids),
        logprobs=[0.0] * len(ids),
        finish_reason=finish,
        response_text=text,
    )


def test_rejection_filters_on_hand_written_samples():
    p = Problem(prompt="3+4=", answer="7", task="arithmetic")
    f = Filters(
        require_correct=True, require_format=True, language="en", min_language_share=0.9, max_ngram_repeats=3
    )
    sc = Scorer({"accuracy": 1.0})
    good = "<think>\n3+4=7\n</think>\n\\boxed{7}"
    cases = {
        "kept": (_sample(good[len("<think>\n") :]), good),
        "truncated": (_sample("3+4=", finish="length"), "<think>\n3+4="),
        "incorrect": (_sample("3+4=8\n</think>\n\\boxed{8}"), "<think>\n3+4=8\n</think>\n\\boxed{8}"),
        "format": (_sample("\\boxed{7}"), "\\boxed{7} no think"),
        "language_mixing": (_sample("x"), "<think>\n我们计算 three plus 四 等于七\n</think>\n\\boxed{7}"),
        "repetition": (_sample("x", ids=[1, 2, 3, 4] * 5), good),
    }
    for expected, (sample, full) in cases.items():
        sample.response_text = full.split("<think>\n", 1)[-1] if expected != "format" else full
        why, _ = rejection_reason(sample, p, full, sc, f)
        assert (why or "kept") == expected, (expected, why)
    assert max_ngram_repeats([1, 2, 3, 4] * 5) == 5 and max_ngram_repeats([1, 2, 3]) == 0


# ---------------------------------------------------------------- manifest


def test_all_scenario_reward_model_is_the_value_head_on_the_last_tokens_final_hidden_state(tmp_path):
    """TransformerRewardModel (a rewards.ScalarHeadRewardModel) against the model run by hand: prompt +
    response encoded, cut to the last max_tokens ids, value head dotted with the last position's state."""
    import r1core
    from safetensors.torch import save_file

    from r1core import rewards
    from r1core.checkpoint.hf import save_pretrained
    from r1core.data import Tokenizer, builtin_corpus
    from r1core.pipeline.all_scenario import TransformerRewardModel

    torch.manual_seed(0)
    tok = Tokenizer.train_bpe(builtin_corpus(300, seed=0), vocab_size=400)
    model = r1core.Transformer(r1core.presets["tiny"]).eval()
    save_pretrained(model, tmp_path)
    tok.save(tmp_path / "tokenizer.json")
    head = torch.randn(model.args.dim)
    save_file({"weight": head}, str(tmp_path / "value_head.safetensors"))
    rm = TransformerRewardModel(tmp_path, max_tokens=6)
    assert isinstance(rm, rewards.ScalarHeadRewardModel)
    prompts, responses = ["2+3=", "What is a cat?"], ["<think>5</think> \\boxed{5}", " An animal."]
    with torch.no_grad():
        want = []
        for p, r in zip(prompts, responses):
            ids = tok.encode(p + r)[-6:]
            h, _ = model.hidden_states(torch.tensor([ids]))
            want.append(float(h[0, -1] @ head))
    assert rm.score(prompts, responses) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_manifest_skips_only_done_stages_with_the_same_hash(tmp_path):
    m = Manifest(tmp_path, "p")
    out = tmp_path / "out.bin"
    out.write_text("x")
    m.start("a", "h1")
    assert not m.is_done("a", "h1")
    m.finish("a", {"model": str(out)}, {}, 1.0)
    assert Manifest(tmp_path, "p").is_done("a", "h1")
    assert not m.is_done("a", "h2")  # config changed: rerun
    out.unlink()
    assert not m.is_done("a", "h1")  # output gone: rerun
    with pytest.raises(RuntimeError, match="belongs to pipeline 'p'"):
        Manifest(tmp_path, "other")


# ---------------------------------------------------------------- wiring and resume


def test_default_pipeline_wires_every_stage_and_a_rerun_skips_them(tmp_path):
    cfg = _cfg(tmp_path, _toy_stages())
    run_pipeline(cfg)
    man = json.loads((tmp_path / "manifest.json").read_text())
    stages = man["stages"]
    assert all(s["status"] == "done" for s in stages.values()), {k: s["status"] for k, s in stages.items()}
    for name in (
        "pretrain",
        "pretrain_student",
        "zero_rl",
        "cold_start_sft",
        "reasoning_rl",
        "sft",
        "all_scenario_rl",
        "distill",
    ):
        assert (Path(stages[name]["outputs"]["model"]) / "config.json").exists(), name
    assert Path(stages["rejection_sampling"]["outputs"]["dataset"]).exists()
    rows = [
        json.loads(x)
        for x in Path(stages["rejection_sampling"]["outputs"]["dataset"]).read_text().splitlines()
    ]
    assert all("provenance" in r for r in rows)
    for name in ("eval_base", "eval_zero", "eval_sft", "eval_r1", "eval_student_base", "eval_student"):
        m = stages[name]["metrics"]
        assert {"pass@1", f"cons@{m['k']}", "greedy", "pass@1_lo", "pass@1_hi", "direct_share"} <= set(m), (
            name
        )
        assert m["pass@1_lo"] <= m["pass@1"] <= m["pass@1_hi"]
    assert stages["eval_base"]["metrics"]["k"] == 16  # the base's pass@k curve reaches k = 16
    # the student is the dense preset: its export has no MoE layer
    student = json.loads((Path(stages["distill"]["outputs"]["model"]) / "config.json").read_text())
    assert student["first_k_dense_replace"] == student["num_hidden_layers"]
    # the export is the last save: no full optimizer checkpoint after the last step (6 steps, every 3)
    assert sorted(p.name for p in (tmp_path / "stages" / "pretrain" / "checkpoints").glob("step_*")) == [
        "step_000003"
    ]
    assert sorted(p.name for p in (tmp_path / "stages" / "zero_rl" / "checkpoints").glob("step_*")) == [
        "step_000001"
    ]
    report = (tmp_path / "report.md").read_text()
    assert "## Held-out evaluation" in report and "## The built-in data" in report
    assert all((tmp_path / png).exists() for png in ("eval.png", "rl.png", "pass_at_k.png", "zero_rl.png"))
    for name, against in (
        ("eval_zero", "eval_base"),
        ("eval_r1", "eval_base"),
        ("eval_r1", "eval_sft"),
        ("eval_student", "eval_base"),
        ("eval_student", "eval_student_base"),
    ):
        assert re.search(
            rf"^\| {name} \| {against} \| [+-]\d\.\d{{3}} \| .* \| \*\*(above|below|no significant change)"
            rf"\*\* \|$",
            report,
            re.M,
        ), (name, against)
    t0 = time.time()
    run_pipeline(cfg)
    assert time.time() - t0 < 30  # nothing reruns


def _weights(run_dir, stage):
    d = Path(run_dir) / "stages" / stage / "model"
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_killed_run_resumes_to_the_same_final_checkpoint(tmp_path):
    overrides = ["pipeline=r1_zero", *TOY, "pretrain.steps=12", "pretrain.save_every=2", "rl.steps=4"]
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "r1core.cli", "run", *overrides]
    proc = subprocess.Popen(
        cmd + [f"run_dir={killed_dir}", f"hydra.run.dir={killed_dir}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = killed_dir / "stages" / "pretrain" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step_000004"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-stage, at whatever point it has reached
    proc.wait()
    assert latest.exists(), "the run never reached its second checkpoint"
    man = json.loads((killed_dir / "manifest.json").read_text())
    assert man["stages"]["pretrain"]["status"] == "running"
    subprocess.run(
        cmd + [f"run_dir={killed_dir}", f"hydra.run.dir={killed_dir}"],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    subprocess.run(
        cmd + [f"run_dir={ref_dir}", f"hydra.run.dir={ref_dir}"],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    for stage in ("pretrain", "zero_rl"):
        a, b = _weights(ref_dir, stage), _weights(killed_dir, stage)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{stage}: {k} differs after resume"


def test_stage_hash_covers_only_the_sections_the_stage_reads(tmp_path):
    from r1core.pipeline.config import config_hash

    def hashes(*extra):
        cfg = _cfg(tmp_path, *extra)
        return {spec.name: config_hash(job, spec) for spec, job in validate_pipeline(cfg, to_job(cfg))}

    base, changed = hashes(), hashes("rl.steps=5")
    assert base["pretrain"] == changed["pretrain"] and base["prepare"] == changed["prepare"]
    assert base["zero_rl"] != changed["zero_rl"]
    assert hashes("pretrain.steps=7")["pretrain"] != base["pretrain"]


def test_a_changed_stage_config_starts_fresh_and_keeps_the_old_directory(tmp_path):
    stages = (
        "pipeline.stages=[{name: prepare, kind: prepare}, {name: pretrain, kind: pretrain}]",
        "pretrain.last_save_model_only=false",
    )  # full checkpoints at the last step too
    run_pipeline(_cfg(tmp_path, *stages))  # pretrain.steps=6, checkpoints at 3 and 6
    old_hash = json.loads((tmp_path / "manifest.json").read_text())["stages"]["pretrain"]["config_hash"]
    run_pipeline(_cfg(tmp_path, *stages, "pretrain.steps=4"))  # must not resume from the 6-step checkpoint

    def steps(stage_dir):
        return (
            [json.loads(r)["step"] for r in (stage_dir / "metrics.jsonl").read_text().splitlines()],
            sorted(p.name for p in (stage_dir / "checkpoints").glob("step_*")),
        )

    logged, ckpts = steps(tmp_path / "stages" / "pretrain")
    assert logged[-1] == 4 and "step_000006" not in ckpts and "step_000004" in ckpts, (logged, ckpts)
    logged, ckpts = steps(
        tmp_path / "stages" / f"pretrain.stale-{old_hash}"
    )  # the earlier run's work is kept
    assert logged[-1] == 6 and "step_000006" in ckpts, (logged, ckpts)
    assert not (tmp_path / "stages" / "prepare.stale-").exists() and not list(
        (tmp_path / "stages").glob("prepare.*")
    )


class _Killed(BaseException):
    pass


def test_rl_stage_killed_mid_run_resumes_with_identical_continuation(tmp_path, monkeypatch):
    """Data order, sampling seeds, optimizer state and the reference model all come back: the resumed
    RL stage logs the same step-3/4 metrics and ends with the same weights as an uninterrupted run."""
    from r1core.train import metrics as metrics_mod

    extra = ("rl.steps=4", "rl.save_every=2", "rl.loss.beta=0.01")
    run_pipeline(_cfg(tmp_path / "ref", *extra, pipeline="r1_zero"))
    real_log = metrics_mod.MetricsLog.log

    def dying_log(self, step, row):
        if step == 3 and "zero_rl" in str(self.path):
            raise _Killed  # after the step-2 checkpoint, with step 3's update already applied in memory
        return real_log(self, step, row)

    monkeypatch.setattr(metrics_mod.MetricsLog, "log", dying_log)
    with pytest.raises(_Killed):
        run_pipeline(_cfg(tmp_path / "killed", *extra, pipeline="r1_zero"))
    monkeypatch.setattr(metrics_mod.MetricsLog, "log", real_log)
    ckpts = tmp_path / "killed" / "stages" / "zero_rl" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000002"
    run_pipeline(_cfg(tmp_path / "killed", *extra, pipeline="r1_zero"))

    def rows(run):
        lines = (tmp_path / run / "stages" / "zero_rl" / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines)}

    ref, resumed = rows("ref"), rows("killed")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("reward", "gen_tokens", "train_reward", "loss", "kl"):
            if key in ref[step]:
                assert resumed[step][key] == ref[step][key], (step, key)
    a, b = _weights(tmp_path / "ref", "zero_rl"), _weights(tmp_path / "killed", "zero_rl")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


# ---------------------------------------------------------------- several processes (gloo)


def _pipeline_rank(rank, world, run_dir, overrides):
    from r1core.pipeline.runner import run_pipeline as run

    run(_compose([f"run_dir={run_dir}", *TOY, *overrides]))
    if rank:
        return None
    man = json.loads((Path(run_dir) / "manifest.json").read_text())
    rows = [
        json.loads(r)
        for r in (Path(run_dir) / "stages" / "zero_rl" / "metrics.jsonl").read_text().splitlines()
    ]
    return {
        "status": {k: v["status"] for k, v in man["stages"].items()},
        "rl": rows,
        "weights": _weights(run_dir, "zero_rl"),
    }


@pytest.mark.parametrize(
    "layout",
    [["parallel.tp=2"], ["parallel.ep=2", "rl.group_size=3"], ["parallel.pp=2", "parallel.microbatches=2"]],
)
def test_rl_pipeline_under_two_processes_matches_one_process(tmp_path, layout):
    """R1-Zero under a 2-rank layout (TP2; DP2 with EP2 and group size 3, so shards get padding rows; PP2):
    rank 0 generates from the gathered weights, every rank trains its shard. Step 1 samples from the
    same weights as one process (same rewards, same tokens); the updates agree to float rounding."""
    from r1core.testing import run_distributed

    overrides = ["pipeline=r1_zero", "rl.steps=3", "rl.loss.beta=0.01", *layout[1:]]
    one = _pipeline_rank(0, 1, str(tmp_path / "one"), overrides)
    two = run_distributed(_pipeline_rank, 2, str(tmp_path / "two"), overrides + layout[:1], timeout=600)[0]
    assert set(two["status"].values()) == {"done"}
    assert len(one["rl"]) == len(two["rl"]) == 3
    for a, b in zip(one["rl"], two["rl"]):
        for key in ("reward", "gen_tokens", "groups_kept", "train_reward", "skipped"):
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))
        for key in ("loss", "kl", "entropy", "grad_norm", "sampler_logprob_diff"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert any("loss" in r for r in one["rl"]), "no RL step made an update"
    assert one["weights"].keys() == two["weights"].keys()
    for k in one["weights"]:  # the pretraining under the layout already differs by float rounding (~1e-5)
        torch.testing.assert_close(two["weights"][k], one["weights"][k], rtol=1e-3, atol=5e-5)


def test_whole_default_pipeline_runs_under_tensor_parallel_two_processes(tmp_path):
    """Every stage kind under torchrun-style TP2: training stages sharded, RL generating on rank 0 from
    gathered weights, eval/rejection sampling on rank 0, distillation's teacher rows broadcast."""
    from r1core.testing import run_distributed

    out = run_distributed(
        _pipeline_rank, 2, str(tmp_path), ["pipeline=default", _toy_stages(), "parallel.tp=2"], timeout=600
    )[0]
    assert out["status"] == {name: "done" for name in out["status"]} and len(out["status"]) == 16
    student = json.loads((tmp_path / "stages" / "distill" / "model" / "config.json").read_text())
    assert student["first_k_dense_replace"] == student["num_hidden_layers"]
    assert "## Held-out evaluation" in (tmp_path / "report.md").read_text()


def test_multirun_sweep_gives_each_job_its_own_run_directory(tmp_path):
    """`r1core run --multirun a=1,2`: Hydra runs one job per value, each in its own run_dir (the sweep
    subdir)."""
    cmd = [
        sys.executable,
        "-m",
        "r1core.cli",
        "run",
        "--multirun",
        "pipeline.stages=[{name: prepare, kind: prepare}]",
        "data.corpus_docs=120,160",
        "data.eval_problems=8",
        f"hydra.sweep.dir={tmp_path}",
        "hydra.sweep.subdir=job${hydra.job.num}",
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    hashes = []
    for job in ("job0", "job1"):
        man = json.loads((tmp_path / job / "manifest.json").read_text())
        assert man["stages"]["prepare"]["status"] == "done", job
        hashes.append(man["stages"]["prepare"]["config_hash"])
    assert hashes[0] != hashes[1]  # each job ran its own value of the swept setting
    assert not (tmp_path / "job2").exists()
