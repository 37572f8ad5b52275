"""The benchmark harness's timing (benchmarks/common.py), on the CPU."""

import os
import sys
import time
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from common import error_report, time_interleaved  # noqa: E402


def test_time_interleaved_round_robin_reports_failures_and_keeps_timing_the_rest():
    calls = []

    def fast():
        calls.append("fast")
        time.sleep(0.002)

    def slow():
        calls.append("slow")
        time.sleep(0.006)

    def broken():
        calls.append("broken")
        raise ValueError("shape mismatch in provider")

    out = time_interleaved({"fast": fast, "slow": slow, "broken": broken}, warmup=1, repeats=4)
    assert out["broken"] == {"error": "ValueError: shape mismatch in provider"}
    assert calls.count("broken") == 1  # dropped after its first failure
    timed = [c for c in calls if c != "broken"]
    assert timed[:6] == ["fast", "slow"] * 3  # round-robin, warmup round included
    assert 2.0 <= out["fast"]["ms"] < out["slow"]["ms"]
    assert out["slow"]["ms"] >= 6.0 and out["slow"]["ms_isolated"] >= 6.0


def test_error_report_names_the_chained_root_cause_and_where_it_was_raised():
    def load():
        try:
            import r1core_no_such_module  # noqa: F401
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError("Could not import module 'DeepseekV3ForCausalLM'") from e

    try:
        load()
    except ModuleNotFoundError as e:
        lines = error_report(e).splitlines()
    assert lines[0] == "ModuleNotFoundError: Could not import module 'DeepseekV3ForCausalLM'"
    assert lines[1] == "ModuleNotFoundError: No module named 'r1core_no_such_module'"
    assert lines[2].startswith("  at ") and "in load: import r1core_no_such_module" in lines[2]


def test_compare_loss_paired_difference_and_its_interval_against_hand_values(tmp_path, monkeypatch):
    import json

    from compare_loss import main, paired_rel_diff

    ref = {1: 2.0, 2: 2.0, 3: 4.0}
    cand = {1: 2.2, 2: 1.8, 3: 4.4}  # relative differences +0.1, -0.1, +0.1
    mean, half = paired_rel_diff(ref, cand, [1, 2, 3])
    sd = (((0.1 - 0.1 / 3) ** 2 * 2 + (-0.1 - 0.1 / 3) ** 2) / 2) ** 0.5
    assert abs(mean - 0.1 / 3) < 1e-12 and abs(half - 1.96 * sd / 3**0.5) < 1e-12
    for name, curve in (("a", ref), ("b", cand)):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"step": s, "ce": v}) + "\n" for s, v in curve.items())
        )
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    rec = main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--window", "2", "--tail", "1"])
    # the window holds steps 2 and 3 (after step 3 - 2): differences -0.1 and +0.1
    assert abs(rec["window_rel_diff"]) < 1e-12 and rec["window_rel_diff_ci95"][1] > 0.09
    assert abs(rec["tail_rel_diff"] - 0.1) < 1e-12


def test_compare_loss_across_seeds_t_interval_against_hand_values(tmp_path, monkeypatch):
    import json

    from compare_loss import main

    # three seeds whose candidate is +10 %, -5 % and +4 % off at every step: mean +3 %, sample sd
    # sqrt((0.07^2 + 0.08^2 + 0.01^2) / 2) = 0.075498, t(0.975, 2 df) = 4.303
    # The references sit at 2.0, 2.2 and 1.8: seed 1 against 0 differs by +10 %, seed 2 against 0 by -10 %,
    # seed 2 against 1 by -2/11, so their rms is sqrt((0.01 + 0.01 + (2/11)^2) / 3) = 0.132989.
    files = []
    for seed, (ref, rel) in enumerate(((2.0, 0.10), (2.2, -0.05), (1.8, 0.04))):
        for name, scale in (("ref", 1.0), ("cand", 1.0 + rel)):
            f = tmp_path / f"s{seed}_{name}.jsonl"
            f.write_text("".join(json.dumps({"step": s, "ce": ref * scale}) + "\n" for s in (5, 10, 15)))
            files.append(str(f))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    rec = main(["--across-seeds", *files, "--window", "10", "--target", "0.02"])
    assert rec["per_seed_rel_diff"] == pytest.approx([0.10, -0.05, 0.04])
    half = 4.303 * 0.0754983 / 3**0.5
    assert rec["mean_rel_diff"] == pytest.approx(0.03)
    assert rec["mean_rel_diff_ci95"] == pytest.approx([0.03 - half, 0.03 + half], rel=1e-5)
    assert rec["per_seed_sd"] == pytest.approx(0.0754983, rel=1e-5)
    assert rec["reference_seeds_rms_rel_diff"] == pytest.approx(0.132989, rel=1e-5)
    assert rec["pairs_for_target"] == 55  # ceil((1.96 * 0.0754983 / 0.02)^2) = ceil(54.74)
    with pytest.raises(SystemExit):
        main(["--across-seeds", *files[:3]])
    # reference runs of two seeds logged at disjoint steps (each still shares steps with its candidate): the
    # noise floor cannot compare them, and the error names both reference files
    disjoint = []
    for seed, steps in enumerate(((5, 10), (6, 11))):
        for name in ("ref", "cand"):
            f = tmp_path / f"d{seed}_{name}.jsonl"
            f.write_text("".join(json.dumps({"step": s, "ce": 2.0}) + "\n" for s in steps))
            disjoint.append(str(f))
    with pytest.raises(SystemExit, match="no common steps with 'ce' in .*d0_ref.jsonl and .*d1_ref.jsonl"):
        main(["--across-seeds", *disjoint])


def test_bench_adamw_names_an_unknown_setting_before_any_work(capsys):
    from bench_adamw import main

    with pytest.raises(SystemExit):
        main(["--tiny", "--settings", "bf16,fp16 master"])
    err = capsys.readouterr().err
    assert "--settings: unknown ['fp16 master']" in err and "'fp32 master'" in err


def test_bench_moe_names_an_unknown_row_kind_before_any_work(capsys, monkeypatch):
    import bench_moe

    def measured(*_):
        raise AssertionError("the ceilings were measured before the arguments were checked")

    monkeypatch.setattr(bench_moe.Ceilings, "measure", measured)
    with pytest.raises(SystemExit):
        bench_moe.main(["--tiny", "--rows", "ffn,permute"])
    err = capsys.readouterr().err
    assert "--rows: unknown ['permute']" in err and "'dispatch'" in err


def test_device_timeline_idle_gaps_and_host_waits_against_hand_values():
    from bench_train import device_timeline

    ms = 1_000_000  # ns
    kernels = [  # (start, end, name): two overlapping, a 3 ms gap, one contained, a 1 ms gap
        (0, 2 * ms, "gemm_a"),
        (1 * ms, 4 * ms, "gemm_b"),
        (7 * ms, 10 * ms, "adam"),
        (8 * ms, 9 * ms, "inside"),
        (11 * ms, 12 * ms, "embed"),
    ]
    host = [
        (0, 12 * ms, "ProfilerStep#1"),
        (3 * ms, 9 * ms, "train_step"),
        (4 * ms, 6 * ms, "cudaStreamSynchronize"),
        (10 * ms, 11 * ms, "aten::_local_scalar_dense"),
    ]
    tl = device_timeline(kernels, host)
    assert tl["window_ms"] == 12.0 and tl["busy_ms"] == 8.0 and tl["idle_ms"] == 4.0
    assert [g["ms"] for g in tl["gaps"]] == [3.0, 1.0]
    first = tl["gaps"][0]
    assert (first["after"], first["before"]) == ("gemm_b", "adam")
    assert first["host"] == "cudaStreamSynchronize < train_step"  # innermost first, no ProfilerStep
    assert tl["gaps"][1]["after"] == "adam"  # the kernel that ended last, not the one that started last
    assert tl["host_waits"] == {
        "cudaStreamSynchronize": {"calls": 1, "ms": 2.0},
        "aten::_local_scalar_dense": {"calls": 1, "ms": 1.0},
    }
    assert device_timeline([], host)["idle_ms"] == 0.0
