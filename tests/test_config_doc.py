"""docs/config.md is generated from the typed schema and stays in sync with it."""

from pathlib import Path

from omegaconf import OmegaConf

from r1core.pipeline.config_doc import render, rows
from r1core.pipeline.config import JobConfig
from test_pipeline import _compose

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_config_doc_is_the_generated_file():
    assert DOC.read_text() == render(), (
        "docs/config.md is stale: python -m r1core.pipeline.config_doc > docs/config.md"
    )


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict) and key not in ("task_kwargs", "overrides", "rewards", "reward_kwargs"):
            yield from _leaves(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                yield from _leaves(item, f"{prefix}{key}[].")
        else:
            yield prefix + key


def test_every_composed_setting_is_documented_with_type_and_default():
    cfg = OmegaConf.to_container(_compose(["run_dir=/tmp/unused", "pipeline=r1"]))
    cfg["distill"].pop("student")  # documented as one row: the same keys as model.*
    documented = {key: (t, default) for key, t, default, _ in rows(JobConfig)}
    missing = sorted(set(_leaves(cfg)) - set(documented))
    assert not missing, f"settings absent from docs/config.md: {missing}"
    assert all(t and default for t, default in documented.values())


def test_settings_of_the_pipeline_data_model_and_training_sections_all_say_what_they_mean():
    owned = (
        "model.",
        "parallel.",
        "optim.",
        "data.",
        "pretrain.",
        "sft.",
        "rejection.",
        "distill.",
        "pipeline.",
        "rollout.",
    )
    blank = [
        key
        for key, _, _, meaning in rows(JobConfig)
        if (key.startswith(owned) or "." not in key) and not meaning.strip()
    ]
    assert not blank, f"add a comment on the declaring line of: {blank}"
