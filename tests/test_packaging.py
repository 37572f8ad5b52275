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
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(ROOT)],
                   check=True, capture_output=True, timeout=600, env={"R1CORE_BUILD_CUDA": "0", "PATH": "/usr/bin:/bin",
                                                                       "HOME": str(tmp_path)})
    probe = f"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]  # hide the dev checkout
sys.path.insert(0, {str(target)!r})
import r1core, r1core.kernels
from r1core.kernels import grpo, moe_router, permute, grouped_gemm
from importlib import resources
assert r1core.kernels.__file__.startswith({str(target)!r}), r1core.kernels.__file__
assert callable(r1core.kernels.moe_route) and callable(r1core.kernels.grouped_swiglu)
assert resources.files("r1core.conf").joinpath("config.yaml").is_file()
assert resources.files("r1core.conf").joinpath("pipeline/r1.yaml").is_file()
assert resources.files("r1core.data").joinpath("builtin/text.txt").is_file()
print("ok", r1core.kernels.__file__)
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok" in r.stdout
