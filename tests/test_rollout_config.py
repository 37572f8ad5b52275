"""The rollout engine chosen in config: builtin by default, sglang refused in one line where it cannot run."""

import importlib.util

import pytest
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
    samples = engine.generate(
        [[1, 2, 3]], n=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=4, seed=0)
    )
    assert len(samples) == 2 and all(len(s.response_ids) == 4 for s in samples)


def test_unknown_engine_is_rejected_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="rollout.engine=vllm"):
        _compose(["run_dir=/tmp/unused", "rollout.engine=vllm"])


def test_sglang_is_refused_before_any_work_with_one_line_when_not_installed(tmp_path, monkeypatch):
    from r1core.rollout import config as rollout_config

    real = importlib.util.find_spec
    monkeypatch.setattr(
        rollout_config.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "sglang" else real(name, *a),
    )
    cfg = _compose([f"run_dir={tmp_path / 'run'}", "rollout.engine=sglang"])
    with pytest.raises(
        ConfigError,
        match=r"^rollout.engine=sglang but SGLang is not installed: "
        r"pip install 'r1core\[sglang\]'",
    ) as e:
        run_pipeline(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_pipeline_stages_build_the_configured_engine_with_its_arguments(monkeypatch):
    from types import SimpleNamespace

    from r1core.pipeline.context import make_rollout
    from r1core.rollout import sglang_engine
    from r1core.rollout.config import EngineKind, SGLangArgs

    made = {}

    class FakeSGLang:
        def __init__(self, model, **kwargs):
            made.update(model=model, **kwargs)

    monkeypatch.setattr(sglang_engine, "SGLangEngine", FakeSGLang)
    model = object()
    rollout = RolloutConfig(
        engine=EngineKind.sglang,
        sglang=SGLangArgs(tp_size=2, mem_fraction_static=0.3, server_args={"max_running_requests": 8}),
    )
    ctx = SimpleNamespace(job=SimpleNamespace(rollout=rollout))
    engine = make_rollout(ctx, SimpleNamespace(model=model), tok="tok", max_len=64)
    assert isinstance(engine, FakeSGLang) and made["model"] is model and made["tokenizer"] == "tok"
    assert made["tp_size"] == 2 and made["mem_fraction_static"] == 0.3 and made["max_running_requests"] == 8
    builtin = make_rollout(
        SimpleNamespace(job=SimpleNamespace(rollout=RolloutConfig())),
        r1core.Transformer(r1core.presets["tiny"]).eval(),
        tok=None,
        max_len=32,
    )
    assert isinstance(builtin, BuiltinEngine)
    # the built-in engine's defaults: auto MoE, and a prompt's samples admitted together
    assert builtin.decode_moe == "auto" and builtin.admit_min == 0
    # compact_rows: on where batches are bucketed (CUDA graphs); the CPU decodes exact batch sizes
    assert builtin.compact_rows is False


def test_builtin_decode_settings_reach_the_engine_and_bad_ones_are_refused_before_work(tmp_path, monkeypatch):
    cfg = _compose(
        ["run_dir=/tmp/unused", "rollout.builtin.decode_moe=grouped", "rollout.builtin.admit_min=3"]
    )
    model = r1core.Transformer(r1core.presets["tiny"]).eval()
    engine = build_rollout(cfg.rollout, model, tokenizer=None, max_len=32, max_batch=4)
    assert engine.decode_moe == "grouped" and engine.admit_min == 3
    seen = {}
    real_init = BuiltinEngine.__init__
    monkeypatch.setattr(
        BuiltinEngine, "__init__", lambda self, *a, **kw: seen.update(kw) or real_init(self, *a, **kw)
    )
    build_rollout(cfg.rollout, model, tokenizer=None, max_len=32, max_batch=4)
    assert seen["compact_rows"] is None  # the default (true): on where batches are bucketed (CUDA graphs)
    off = _compose(["run_dir=/tmp/unused", "rollout.builtin.compact_rows=false"])
    build_rollout(off.rollout, model, tokenizer=None, max_len=32, max_batch=4)
    assert seen["compact_rows"] is False
    with pytest.raises(ConfigCompositionException, match="rollout.builtin.decode_moe=sparse"):
        _compose(["run_dir=/tmp/unused", "rollout.builtin.decode_moe=sparse"])
    cfg = _compose([f"run_dir={tmp_path / 'run'}", "rollout.builtin.admit_min=-1"])
    with pytest.raises(ConfigError, match=r"^rollout.builtin.admit_min=-1 must be >= 0"):
        run_pipeline(cfg)
    assert not (tmp_path / "run").exists()


def test_the_decode_moe_setting_names_exactly_the_engines_decode_paths():
    from r1core.rollout.config import DecodeMoE
    from r1core.rollout.decode import MOE_PATHS

    assert {m.value for m in DecodeMoE} == {*MOE_PATHS, "model"}
