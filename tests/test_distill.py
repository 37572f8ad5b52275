"""Distillation into a dense student that starts from a pretrained base (`distill.student_init`)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from r1core.pipeline.config import ConfigError
from r1core.pipeline.runner import StageFailed, run_pipeline
from test_pipeline import TOY, _compose

STUDENT = "{model.n_dense_layers: 4, model.n_mtp_modules: 0}"


def _stages(student_init: str, student_overrides: str = STUDENT) -> str:
    distill = (
        "{distill.student_init: " + student_init + ", sft.lr: 1.0e-12}"
        if student_init
        else "{sft.lr: 1.0e-12}"
    )
    return (
        "pipeline.stages=[{name: prepare, kind: prepare}, {name: teacher, kind: pretrain}, "
        f"{{name: student_base, kind: pretrain, init: scratch, overrides: {student_overrides}}}, "
        f"{{name: distill, kind: distill, init: teacher, overrides: {distill}}}]"
    )


def _weights(run_dir, stage) -> dict[str, torch.Tensor]:
    out = {}
    for f in (run_dir / "stages" / stage / "model").glob("*.safetensors"):
        out.update(load_file(f))
    return out


def _run(run_dir, stages):
    run_pipeline(_compose([f"run_dir={run_dir}", *TOY, "distill.prompts=2", stages]))
    return json.loads((run_dir / "manifest.json").read_text())["stages"]


def test_the_student_starts_from_its_base_and_a_base_directory_of_another_shape_fails_first(tmp_path):
    # sft.lr ~ 0: the distilled student is where it started. Its base trained 6 AdamW steps at 3e-4 from the
    # same seed's initial weights, so a student started afresh would differ from it by ~1e-3.
    stages = _run(tmp_path, _stages("student_base"))
    base, student = _weights(tmp_path, "student_base"), _weights(tmp_path, "distill")
    assert base.keys() == student.keys()
    for name, t in base.items():
        torch.testing.assert_close(student[name].float(), t.float(), rtol=0, atol=1e-6, msg=name)
    # an HF directory of another shape as the base (the teacher's): named with what differs, before sampling;
    # the rerun keeps every earlier stage and starts distill afresh
    teacher_dir = stages["teacher"]["outputs"]["model"]
    with pytest.raises(
        StageFailed, match=r"stage 'distill' .*config.json: differs from .* in .*n_dense_layers"
    ):
        _run(tmp_path, _stages(teacher_dir))
    assert not (tmp_path / "stages" / "distill" / "teacher_samples.jsonl").exists()


def test_a_student_base_of_another_shape_is_named_before_any_work(tmp_path):
    other = "{model.n_dense_layers: 3, model.n_layers: 3, model.n_mtp_modules: 0}"
    with pytest.raises(
        ConfigError, match=r"student_init='student_base' trains another shape .*n_dense_layers"
    ):
        _run(tmp_path / "run", _stages("student_base", other))
    assert not (tmp_path / "run").exists()
