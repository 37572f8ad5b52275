"""Packaging: the README quick start, CI's command, and a non-editable install that ships the kernels."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_quick_start_is_exactly_two_commands_and_ci_runs_the_second():
    commands = _quick_start()
    assert len(commands) == 2, commands
    assert "r1core run" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci, f"{commands[1]!r} is not a line of .ci/run"


def test_non_editable_install_ships_kernels_and_configs(tmp_path):
    target = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--target", str(target), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
        env={"R1CORE_BUILD_CUDA": "0", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    # setuptools ships a folder's data files only from listed packages, and warns of data-only folders
    # left out (conf/pipeline, r1core/data/builtin before setup.py listed namespace packages)
    assert "absent from the `packages` configuration" not in built.stdout + built.stderr
    probe = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]  # hide the dev checkout
sys.path.insert(0, {str(target)!r})
import r1core, r1core.kernels
from r1core.kernels import grpo_loss, grpo_loss_terms, moe_route, moe_permute, grouped_swiglu, moe_cuda
from r1core.model.moe import moe_ops
from importlib import resources
assert r1core.kernels.__file__.startswith({str(target)!r}), r1core.kernels.__file__
assert moe_ops("triton") == (moe_route.moe_route, moe_permute.moe_permute, moe_permute.moe_unpermute,
                             grouped_swiglu.grouped_swiglu)
assert resources.files("r1core.conf").joinpath("config.yaml").is_file()
assert resources.files("r1core.conf").joinpath("pipeline/r1.yaml").is_file()
assert resources.files("r1core.data").joinpath("builtin/text.txt").is_file()
print("ok", r1core.kernels.__file__)
"""
    r = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok" in r.stdout
    (shipped,) = target.glob("r1core-*.dist-info/licenses/LICENSE")
    assert shipped.read_text() == (ROOT / "LICENSE").read_text()


def test_license_file_is_the_apache_2_license_pyproject_declares():
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    text = (ROOT / "LICENSE").read_text()
    assert declared == "Apache-2.0"
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text


# top-level entries of the repository a user-facing document may point into
_REPO_DIRS = ("r1core/", "docs/", "examples/", "benchmarks/", "tests/", "conf/", "csrc/", ".ci/")


def _user_docs() -> list[Path]:
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "examples").rglob("*.md")),
        ROOT / "r1core" / "rewards" / "README.md",
    ]


def test_user_docs_point_only_at_files_inside_the_repository():
    for doc in _user_docs():
        text = doc.read_text()
        outside = re.findall(r"\.\./[\w./-]+|/work/[\w./-]+|\bshared/[\w.-]+\.md", text)
        assert not outside, f"{doc.relative_to(ROOT)} points outside the repository: {outside}"
        for path in re.findall(r"`((?:%s)[\w./-]*?)[`:]" % "|".join(map(re.escape, _REPO_DIRS)), text):
            target = ROOT / path.split("::")[0]
            assert target.exists() or any(ROOT.glob(path)) or _output_location(path), (
                f"{doc.relative_to(ROOT)} names {path}, which does not exist"
            )


def _output_location(path: str) -> bool:
    """A path the repository ignores (`benchmarks/out`): runs create it, a fresh clone has none."""
    candidates = (path, path.rstrip("/") + "/")  # a missing folder matches only `folder/` patterns
    return any(subprocess.run(["git", "check-ignore", "-q", c], cwd=ROOT).returncode == 0 for c in candidates)


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    """`python -c code` from the repository root: the root is sys.path[0], as under `python -m pytest`."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_repo_kernels_folder_never_shadows_the_pypi_kernels_package(tmp_path):
    # A stand-in for the PyPI package `kernels` (transformers >= 5.25 imports it) on a later sys.path entry.
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'the pypi package'\n")
    (site / "kernels" / "layers.py").write_text("X = 1\n")
    r = _run_from_root(f"""
import sys
assert sys.path[0] == '', sys.path[:2]
sys.path.insert(1, {str(site)!r})
import kernels, kernels.layers
from kernels import CUDAProperties
assert CUDAProperties == 'the pypi package' and kernels.layers.X == 1, kernels.__file__
import r1core.kernels
from r1core.model.moe import moe_ops
assert r1core.kernels.__file__.startswith({str(ROOT / "r1core" / "kernels")!r})
assert moe_ops("cuda").experts is not None
print("ok")
""")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_nothing_in_the_repository_answers_to_the_top_level_name_kernels():
    # transformers 5.17 imports `kernels` when find_spec finds one; 5.25 needs the PyPI package: from the
    # repository root (sys.path[0] under `python -m pytest`) no folder of ours may be found under that name.
    r = _run_from_root("""
import importlib.util, sys
sys.path[:] = [p for p in sys.path if 'packages' not in p]  # no installed packages, the root first
assert importlib.util.find_spec('kernels') is None, importlib.util.find_spec('kernels')
print("ok")
""")
    assert r.returncode == 0 and "ok" in r.stdout, (r.stdout, r.stderr[-3000:])


def test_transformers_deepseek_v3_builds_from_the_repo_root():
    # What broke CI when transformers 5.25 began importing `kernels` from its model code.
    r = _run_from_root("""
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
cfg = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                       num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
                       num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                       topk_group=1, q_lora_rank=16,
                       kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
model = DeepseekV3ForCausalLM(cfg)
print("ok", tuple(model(torch.zeros(1, 4, dtype=torch.long)).logits.shape))
""")
    assert r.returncode == 0 and "ok (1, 4, 64)" in r.stdout, r.stderr[-3000:]
