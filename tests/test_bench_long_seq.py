"""benchmarks/bench_long_seq.py's sweep on the CPU with a stand-in step: where it stops and why."""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_long_seq  # noqa: E402


def _sweep(monkeypatch, fits_up_to: int, s_at_8k: float, budget_s: float) -> list[dict]:
    def step(args, seq, steps, device, dtype, world):
        if seq > fits_up_to:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return {"seq": seq, "s_per_step": s_at_8k * (seq / 8192) ** 2, "peak_gib_per_rank": 1.0, "loss": 1.0}

    monkeypatch.setattr(bench_long_seq, "measure", step)
    a = argparse.Namespace(seqs="", max_seq=1 << 20, steps=1, budget_s=budget_s)
    return bench_long_seq.sweep(None, a, "cpu", torch.float32, 1, None)


def test_long_seq_sweep_doubles_past_32k_until_a_length_runs_out_of_memory(monkeypatch):
    rows = _sweep(monkeypatch, fits_up_to=131072, s_at_8k=1e-6, budget_s=1e9)
    assert [r["seq"] for r in rows] == [8192, 32768, 65536, 131072, 262144]
    assert all("error" not in r for r in rows[:-1])
    assert rows[-1]["error"].startswith("out of memory: OutOfMemoryError")


def test_long_seq_sweep_skips_a_length_whose_predicted_time_overruns_the_budget(monkeypatch):
    # quadratic steps: 32K predicted 16 x 1 s x (1 + 2) steps = 48 s < 100 s; 64K 4 x 16 s x 3 = 192 s
    rows = _sweep(monkeypatch, fits_up_to=1 << 20, s_at_8k=1.0, budget_s=100.0)
    assert [r["seq"] for r in rows] == [8192, 32768, 65536]
    assert "error" not in rows[1]
    assert rows[-1]["error"] == "skipped: about 192 s more would overrun the 100 s budget"
