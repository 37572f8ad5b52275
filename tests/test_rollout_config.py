"""The rollout engine chosen in config: builtin by default, sglang refused in one line where it cannot run."""

import importlib.util
import subprocess
import sys

import pytest
import torch
from hydra.errors import ConfigCompositionException

import r1core
from r1core.pipeline.config import ConfigError
from r1core.pipeline.runner import run_pipeline
from r1core.rollout import BuiltinEngine, SamplingParams
from r1core.rollout.config import RolloutConfig, build_rollout
from test_pipeline import _compose


def test_builtin_engine_is_the_default_and_generates():
    model = r1core.Transformer(r1core.presets["tiny"]).eval()
    cfg = _compose(["run_dir=/tmp/unused"])
    assert cfg.rollout.engine.value == "builtin"
    engine = build_rollout(RolloutConfig(), model, tokenizer=None, max_len=32, max_batch=4)
    assert isinstance(engine, BuiltinEngine)
    samples = engine.generate([[1, 2, 3]], n=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=4, seed=0))
    assert len(samples) == 2 and all(len(s.response_ids) == 4 for s in samples)


def test_unknown_engine_is_rejected_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="rollout.engine=vllm"):
        _compose(["run_dir=/tmp/unused", "rollout.engine=vllm"])


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="SGLang is installed here")
def test_sglang_without_sglang_installed_fails_before_any_work_with_one_line(tmp_path):
    cfg = _compose([f"run_dir={tmp_path / 'run'}", "rollout.engine=sglang"])
    with pytest.raises(ConfigError, match=r"^rollout.engine=sglang but SGLang is not installed: pip install "
                                          r"'r1core\[sglang\]'"):
        run_pipeline(cfg)
    assert not (tmp_path / "run").exists()
    done = subprocess.run([sys.executable, "-m", "r1core.cli", "run", f"run_dir={tmp_path}/x",
                           f"hydra.run.dir={tmp_path}/x", "rollout.engine=sglang"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "rollout.engine=sglang" in line]
    assert len(errors) == 1, errors
