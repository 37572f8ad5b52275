"""R1-Zero works on the CPU: a fixed-seed run of the embedded default's R1-Zero stages lifts held-out
pass@1 by more than two standard errors of the paired difference, and the response length rises.

Properties of the run, not timings. The built-in corpus (conf/pipeline/default.yaml, the report's
data section) mixes direct answers, often wrong, with worked solutions, mostly right, so the base
model's pass@k is far above its pass@1 and most GRPO groups carry signal; the accuracy reward then
teaches the policy to work problems out, which is longer. These are the demo's settings, so the
test also guards the embedded default against regressions.
"""

import json

from hydra import compose, initialize_config_module

from r1core.pipeline.config import register_configs
from r1core.pipeline.runner import run_pipeline
from r1core.rl.stats import paired_difference

R1_ZERO_STAGES = (
    "pipeline.stages=[{name: prepare, kind: prepare}, {name: pretrain, kind: pretrain}, "
    "{name: eval_base, kind: eval}, "
    "{name: zero_rl, kind: reasoning_rl, init: pretrain, overrides: {optim.schedule: constant}}, "
    "{name: eval_zero, kind: eval}]"
)


def _per_problem(run_dir, stage):
    ev = json.loads((run_dir / "stages" / stage / "eval.json").read_text())
    return ev["per_problem_pass1"], ev


def test_r1_zero_lifts_held_out_pass_at_1_and_response_length(tmp_path):
    register_configs()
    with initialize_config_module(config_module="r1core.conf", version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["pipeline=default", f"run_dir={tmp_path}", R1_ZERO_STAGES]
        )
    run_pipeline(cfg)
    base, base_ev = _per_problem(tmp_path, "eval_base")
    zero, zero_ev = _per_problem(tmp_path, "eval_zero")
    assert base_ev["problems"] == zero_ev["problems"] >= 200
    diff = paired_difference(base, zero)
    assert diff.mean > 2 * diff.se and diff.verdict() == "above", (base_ev["pass@1"], zero_ev["pass@1"], diff)

    rows = [
        json.loads(x) for x in (tmp_path / "stages" / "zero_rl" / "metrics.jsonl").read_text().splitlines()
    ]
    lengths = [r["response_len"] for r in rows]
    first, last = sum(lengths[:5]) / 5, sum(lengths[-5:]) / 5
    assert last >= 1.1 * first, (first, last, lengths)
    report = (tmp_path / "report.md").read_text()
    assert "| eval_zero | eval_base |" in report and "**above**" in report
