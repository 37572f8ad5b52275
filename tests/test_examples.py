"""Every example in examples/ runs, at tiny scale on the CPU, with the commands its README shows."""

import json
import math
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_byo import hf_dir  # noqa: F401  (the transformers-saved checkpoint fixture)
from test_pipeline import TOY

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _bash(script, *args, env=None, timeout=300):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        **(env or {}),
    }
    return subprocess.run(
        ["bash", str(EXAMPLES / script), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _json_lines(text):
    return [json.loads(x) for x in text.splitlines() if x.startswith("{")]


# ---------------------------------------------------------------- distributed


def _printed_command(script, *args, env):
    """The command an example would run (its DRY_RUN=1 output), as an argument list."""
    done = _bash(script, *args, env={"DRY_RUN": "1", **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return shlex.split(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "script, preset, env, layout",
    [
        ("distributed/train_node.sh", "v2_lite", {}, dict(world_size=8, tp=2, pp=1, ep=4, dp=4)),
        ("distributed/train_node.sh", "v3", {}, dict(world_size=8, tp=1, pp=1, ep=8, dp=8, n_layers=4)),
        (
            "distributed/train_slurm.sbatch",
            "v2_lite",
            {"NNODES": "3"},
            dict(world_size=24, tp=2, pp=3, ep=4, dp=4),
        ),
        (
            "distributed/train_slurm.sbatch",
            "v3",
            {"NNODES": "256"},
            dict(world_size=2048, tp=8, pp=1, ep=256, dp=256, n_layers=61, routed_experts_per_rank=1),
        ),
    ],
)
def test_distributed_example_layouts_are_valid(script, preset, env, layout, capsys):
    """CHECK=1 validates the script's layout; its command runs here in-process (one interpreter start
    saved)."""
    from r1core.train.__main__ import main

    cmd = _printed_command(script, env={"CHECK": "1", "PRESET": preset, **env})
    assert cmd[:4] == ["python", "-m", "r1core.train", "--check"]
    (out,) = main(cmd[3:])
    assert {k: out[k] for k in layout} == layout
    assert json.loads(capsys.readouterr().out) == out


def test_distributed_example_names_why_a_layout_cannot_run():
    from r1core.train.__main__ import main

    cmd = _printed_command(
        "distributed/train_node.sh", env={"CHECK": "1", "PRESET": "v3", "LAYOUT": "--tp 8 --pp 2"}
    )
    with pytest.raises(SystemExit, match="n_layers=61 is not divisible by the 2 pipeline stages"):
        main(cmd[3:])


def _check_steps(stdout, n):
    steps = _json_lines(stdout)
    assert [s["step"] for s in steps] == list(range(1, n + 1)), stdout[-2000:]
    assert all(math.isfinite(s["loss"]) and s["loss"] > 0 for s in steps)


def test_node_example_trains_with_torchrun_on_two_gloo_processes():
    done = _bash(
        "distributed/train_node.sh",
        "--steps",
        "2",
        "--batch",
        "4",
        "--seq-len",
        "16",
        env={"PRESET": "tiny", "NPROC": "2", "LAYOUT": "--tp 2", "DTYPE": "fp32"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _check_steps(done.stdout, 2)
    assert "Transformer Engine" not in done.stderr  # megatron-core's import warnings are filtered


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slurm_example_trains_on_two_nodes_through_srun_and_rendezvous(tmp_path):
    """Two 'nodes' of one process each on this machine: a stand-in srun starts the script's torchrun line once
    per node, as SLURM would, and the two agents meet through the c10d rendezvous on the first host."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho localhost\n")
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\nshift  # --ntasks-per-node=1\n"
        'for n in $(seq 1 "$SLURM_NNODES"); do "$@" & done\nwait -n && wait -n\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_ID": "7",
        "GPUS_PER_NODE": "1",
        "PRESET": "tiny",
        "LAYOUT": "--tp 2",
        "DTYPE": "fp32",
        "PORT": str(_free_port()),
    }
    done = _bash("distributed/train_slurm.sbatch", "--steps", "2", "--batch", "4", "--seq-len", "16", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_steps(done.stdout, 2)


# ---------------------------------------------------------------- benchmarks


def test_benchmarks_example_runs_a_tiny_bench_and_summarizes_its_json(tmp_path):
    done = _bash(
        "benchmarks/run.sh",
        "--skip-hf",
        "--variants",
        "eager",
        "--repeats",
        "1",
        env={"TINY": "1", "BENCHES": "bench_rollout", "OUT": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-2])  # the bench's last line, before "results: ..."
    assert record["bench"] == "bench_rollout" and (tmp_path / "bench_rollout.json").exists()
    sys.path.insert(0, str(EXAMPLES / "benchmarks"))
    try:
        from summarize import main as summarize
    finally:
        sys.path.pop(0)
    lines = summarize([str(tmp_path)])
    tokens_s = record["results"]["r1core eager"]["tokens_per_s"]
    assert lines[0].startswith("bench_rollout on cpu")
    assert lines[1].startswith("   r1core eager: seconds") and f"tokens/s {tokens_s:.4g}" in lines[1]


# ---------------------------------------------------------------- continue from a checkpoint


def test_continue_rl_example_runs_r1_zero_from_a_checkpoint_on_the_sample_data(tmp_path, hf_dir):  # noqa: F811
    from r1core.pipeline.runner import run_pipeline
    from test_pipeline import _compose

    run = tmp_path / "run"
    overrides = [o for o in TOY if not o.startswith("data.")]
    cmd = _printed_command("continue_rl/run.sh", str(hf_dir), *overrides, env={"RUN_DIR": str(run)})
    assert cmd[:3] == ["r1core", "run", "pipeline=r1_zero"]
    run_pipeline(_compose([a for a in cmd[2:] if not a.startswith("hydra.")]))  # the same command, in-process
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert all(s["status"] == "done" for s in stages.values())
    assert stages["pretrain"]["outputs"]["model"] == str(hf_dir.resolve())
    kept = (run / "stages" / "prepare" / "rl_prompts.jsonl").read_text().splitlines()
    assert len(kept) == len((EXAMPLES / "data" / "train.jsonl").read_text().splitlines())
    assert "| eval_zero |" in (run / "report.md").read_text()
