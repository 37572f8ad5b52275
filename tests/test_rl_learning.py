"""GRPO learns: a fixed-seed R1-Zero run on the CPU raises held-out accuracy of a pretrained tiny model.

A property of the run (accuracy before vs after RL), not a timing. Uses the embedded demo's
settings (conf/pipeline/default.yaml) on its R1-Zero stages only, with fewer steps.
"""

import json

from hydra import compose, initialize_config_module

from r1core.pipeline.config import register_configs
from r1core.pipeline.runner import run_pipeline

R1_ZERO_STAGES = ("pipeline.stages=[{name: prepare, kind: prepare}, {name: pretrain, kind: pretrain}, "
                  "{name: eval_base, kind: eval}, {name: zero_rl, kind: reasoning_rl, "
                  "overrides: {optim.schedule: constant}}, {name: eval_zero, kind: eval}]")


def test_grpo_raises_held_out_accuracy_of_a_pretrained_tiny_model(tmp_path):
    register_configs()
    with initialize_config_module(config_module="r1core.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "pipeline=default", f"run_dir={tmp_path}", R1_ZERO_STAGES,
            "rl.steps=30", "eval.problems=200"])
    run_pipeline(cfg)
    stages = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    before, after = stages["eval_base"]["metrics"], stages["eval_zero"]["metrics"]
    assert 0.05 < before["pass@1"] < 0.9, before  # the base is neither hopeless nor already solved
    assert after["pass@1"] > before["pass@1"] + 0.03, (before, after)
    rows = [json.loads(x) for x in (tmp_path / "stages" / "zero_rl" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and all("reward/accuracy" in r for r in rows)
