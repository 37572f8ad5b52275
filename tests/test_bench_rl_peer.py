"""benchmarks/bench_rl_peer.py: argument parsing, the shared-settings mapping, scoring, the report; with TRL
installed (the `bench` extra) also a tiny end-to-end run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_rl_peer as peer  # noqa: E402

from r1core.data.tasks import Problem  # noqa: E402


def test_tiny_preset_fills_settings_and_flags_override_it():
    s = peer.settings_from_args(peer.parse_args(["--tiny", "--steps", "3", "--lr", "1e-4"]))
    assert (s.steps, s.lr, s.prompts_per_step, s.group_size, s.eval_problems) == (3, 1e-4, 8, 8, 100)
    assert s.samples_per_step == 64
    a = peer.parse_args(["--run-dir", "runs/x", "--base-override", "data.corpus_docs=100"])
    assert not a.tiny and a.run_dir == "runs/x" and a.out == "benchmarks/out"
    assert a.base_override == ["data.corpus_docs=100"]
    assert peer.settings_from_args(a).prompts_per_step == 16


def test_both_sides_get_the_same_budget_loss_clip_and_optimizer():
    s = peer.PeerSettings(
        steps=7,
        prompts_per_step=3,
        group_size=5,
        max_new_tokens=20,
        lr=2e-5,
        eps_low=0.1,
        eps_high=0.3,
        weight_decay=0.0,
        betas=(0.9, 0.99),
        grad_clip=0.5,
    )
    rl, optim = peer.r1core_configs(s)
    t = peer.trl_kwargs(s, "/tmp/x", cuda=False)
    assert (rl.steps, rl.prompts_per_step, rl.group_size) == (t["max_steps"], 3, t["num_generations"])
    assert (
        rl.prompts_per_step * rl.group_size == t["per_device_train_batch_size"] == rl.micro_batch_size == 15
    )
    sampling = rl.sampling
    assert sampling.max_new_tokens == t["max_completion_length"] == 20
    assert sampling.temperature == t["temperature"] == 1.0 and sampling.top_p == t["top_p"] == 1.0
    assert sampling.top_k == t["top_k"] == 0
    assert (rl.loss.eps_low, rl.loss.eps_high) == (t["epsilon"], t["epsilon_high"]) == (0.1, 0.3)
    assert rl.loss.beta == t["beta"] == 0.0
    assert rl.loss.agg.value == "token_mean" and t["loss_type"] == "dapo"
    assert rl.advantage.value == "grpo" and t["scale_rewards"] == "group" and rl.adv_eps == 1e-4
    assert not rl.dynamic_sampling and rl.tis_cap is None and rl.minibatches == t["num_iterations"] == 1
    assert rl.rewards == {"accuracy": 1.0} and rl.overlong.value == "none"
    assert not t["mask_truncated_completions"] and not t["shuffle_dataset"] and not t["use_vllm"]
    assert (
        optim.lr == rl.lr == t["learning_rate"]
        and optim.schedule.value == t["lr_scheduler_type"] == "constant"
    )
    assert optim.warmup_steps == t["warmup_steps"] == 0
    assert optim.betas == (t["adam_beta1"], t["adam_beta2"]) and optim.eps == t["adam_epsilon"]
    assert optim.weight_decay == t["weight_decay"] and optim.grad_clip == t["max_grad_norm"] == 0.5
    assert rl.save_every > rl.steps  # no checkpoint writes inside the timed steps


def test_trl_reward_scores_r1core_text_up_to_the_first_eos():
    class Tok:
        def decode(self, ids):
            return "".join({5: "<think>x</think>", 6: "\\boxed{7}", 7: "\\boxed{8}"}[i] for i in ids)

    problems = [
        Problem(prompt="3+4", answer="7", task="arithmetic"),
        Problem(prompt="4+4", answer="8", task="arithmetic"),
    ]
    reward = peer.trl_reward(problems, Tok(), eos_id=1)
    # the second completion's boxed answer comes after eos: r1core's rollout would never see it
    assert reward(None, None, [[5, 6, 1, 2], [5, 1, 7], [5, 6]], [0, 1, 0]) == [1.0, 0.0, 1.0]


def _fixed_record():
    s = peer.PeerSettings(steps=4, prompts_per_step=2, group_size=4, eval_problems=4, eval_k=4)
    base = [0.0, 0.25, 0.5, 0.0]
    runs = [
        (peer.Trained("trl 1.16.0", Path("a"), [2.0, 4.0, 4.0, 5.0], 0.1), [0.0, 0.25, 0.5, 0.25]),
        (peer.Trained("r1core", Path("b"), [1.0, 1.0, 2.0, 1.0], 0.2), [0.5, 0.75, 1.0, 0.5]),
    ]
    return peer.summarize(s, base, runs)


def test_summary_has_median_step_time_paired_gains_and_head_to_head():
    rec = _fixed_record()
    trl_row, ours = rec["providers"]
    assert (
        trl_row["s_per_step"] == 4.0
        and trl_row["samples_per_s"] == 2.0
        and trl_row["s_per_step_mean"] == 3.75
    )
    assert ours["s_per_step"] == 1.0 and ours["samples_per_s"] == 8.0
    assert rec["pass1_base"]["mean"] == pytest.approx(0.1875)
    assert trl_row["gain"]["mean"] == pytest.approx(0.0625) and ours["gain"]["mean"] == pytest.approx(0.5)
    assert ours["verdict"] == "above"  # every problem improved: the interval excludes zero
    assert rec["head_to_head"]["what"] == "r1core - trl 1.16.0"
    assert rec["head_to_head"]["mean"] == pytest.approx(0.4375)


def test_report_prints_the_table_and_ends_with_the_json_it_writes(tmp_path, capsys):
    rec = _fixed_record()
    peer.report(rec, tmp_path)
    lines = capsys.readouterr().out.strip().splitlines()
    assert "| provider" in lines[1] and "s/step" in lines[1] and "gain [95% CI]" in lines[1]
    row = next(line for line in lines if line.startswith("| r1core"))
    assert "0.188 -> 0.688" in row and "+0.500 [" in row and "above" in row
    assert json.loads(lines[-1]) == json.loads((tmp_path / "rl_peer.json").read_text())
    assert (tmp_path / "rl_peer.png").stat().st_size > 0


@pytest.mark.slow
def test_tiny_end_to_end_makes_a_base_trains_both_and_reports(tmp_path, capsys):
    pytest.importorskip("trl")
    overrides = [
        "data.corpus_docs=800",
        "data.cold_start_examples=20",
        "data.eval_problems=4",
        "pretrain.batch_size=8",
        "pretrain.micro_batch_size=8",
    ]
    rec = peer.main(
        [
            "--tiny",
            "--out",
            str(tmp_path),
            "--pretrain-steps",
            "2",
            "--steps",
            "2",
            "--prompts-per-step",
            "2",
            "--group-size",
            "2",
            "--max-new-tokens",
            "8",
            "--eval-problems",
            "4",
            "--eval-k",
            "2",
            *[f"--base-override={o}" for o in overrides],
        ]
    )
    assert [p["provider"].split()[0] for p in rec["providers"]] == ["trl", "r1core"]
    for p in rec["providers"]:
        assert p["s_per_step"] > 0 and p["steps_timed"] == 2 and p["gain"]["n"] == 4 and p["verdict"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bench"] == "rl_peer"
    assert (tmp_path / "rl_peer.png").exists()


def test_list_dataset_standin_serves_rows_columns_and_length_like_datasets():
    datasets = pytest.importorskip("datasets")  # the reference; the `bench` extra installs it
    import standins

    rows = [{"prompt": f"p{i}", "answer": str(i), "problem_idx": i} for i in range(5)]
    ours, ref = standins.ListDataset.from_list(rows), datasets.Dataset.from_list(rows)
    assert len(ours) == len(ref) == 5 and ours.column_names == ref.column_names
    assert [ours[i] for i in range(5)] == [ref[i] for i in range(5)]
    assert ours["answer"] == list(ref["answer"]) and ours.cache_files == ref.cache_files == []
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    assert [dict(r) for r in standins.ListDataset.from_dict(cols)] == [dict(r) for r in ref]


def test_standins_replace_only_missing_modules_unless_forced(monkeypatch):
    import importlib.util

    import standins

    saved = {k: sys.modules.get(k) for k in ("datasets", "pandas")}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "datasets" else object())
    try:
        assert standins.install() == ["datasets"]
        assert sys.modules["datasets"].Dataset is standins.ListDataset
        assert sys.modules.get("pandas") is saved["pandas"]
        with pytest.raises(RuntimeError, match="pyarrow"):
            sys.modules["datasets"].load_dataset("x")
        assert standins.install(force=True) == ["datasets", "pandas"]
        with pytest.raises(RuntimeError, match="log_completions"):
            sys.modules["pandas"].DataFrame({})
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
