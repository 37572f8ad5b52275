"""The rollout sampler's untruncated draw: the one-kernel inverse CDF (r1core.kernels.inverse_cdf) against the
torch path it replaced on CUDA, at decode batch sizes and the small-preset and V3 vocabularies.

    python benchmarks/bench_inverse_cdf.py            # GPU
    python benchmarks/bench_inverse_cdf.py --tiny     # CPU smoke run (the kernel under TRITON_INTERPRET=1)

Providers, timed round-robin in one run on the same log-probabilities and uniforms:
  torch            what sample() ran before on CUDA: exp, an fp64 copy, its cumsum, searchsorted
  torch compiled   the same under torch.compile (as in the compiled decode step: inductor fuses exp and the
                   cast; the cumsum stays aten's, an opaque op)
  triton           inverse_cdf: two passes over logp in one kernel, one index per row written
GB/s counts the kernel's own traffic (logp read twice) for every provider, so it compares like with like; the
ratio column is the torch provider's time / this provider's (> 1: faster). The last line is the JSON record.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Ceilings, Table, device, finish, time_interleaved  # noqa: E402

from r1core.kernels.inverse_cdf import inverse_cdf  # noqa: E402
from r1core.rollout.sampling import _inverse_cdf  # noqa: E402

VOCABS = {"small": 32768, "v3": 129280}
BATCHES = (64, 256, 1024)


def providers(logp: torch.Tensor, u: torch.Tensor, compile_: bool) -> dict:
    def torch_path():
        return _inverse_cdf(logp.exp(), u)

    fns = {"torch": torch_path}
    if compile_:
        fns["torch compiled"] = torch.compile(torch_path)
    if logp.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        fns["triton"] = lambda: inverse_cdf(logp, u)
    return fns


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: B 4, V 300, no compile")
    a = ap.parse_args(argv)
    dev = device()
    ceil = Ceilings.measure()
    cases = [("tiny", 300, 4)] if a.tiny else [(n, V, B) for n, V in VOCABS.items() for B in BATCHES]
    table = Table(
        f"inverse-CDF draw (copy bandwidth {ceil.copy_gbps:,.0f} GB/s)",
        ["vocab", "B", "provider", "ms", "GB/s", "% of copy", "× torch"],
    )
    rows = []
    for name, V, B in cases:
        g = torch.Generator(device=dev).manual_seed(0)
        logp = (torch.randn(B, V, device=dev, generator=g) * 2).log_softmax(-1)
        u = torch.rand(B, device=dev, dtype=torch.float64, generator=g)
        fns = providers(logp, u, compile_=not a.tiny)
        want = fns["torch"]()
        res = time_interleaved(fns, warmup=2, repeats=a.repeats, isolated=False)
        base = res["torch"].get("ms")
        for prov, r in res.items():
            if "error" in r:
                table.add(name, B, prov, "failed: " + r["error"][:80], "", "", "")
                rows.append({"vocab": name, "V": V, "B": B, "provider": prov, **r})
                continue
            differ = int((fns[prov]() != want).sum())  # rows whose draw differs from the torch path
            gbps = 2 * logp.numel() * logp.element_size() / r["ms"] / 1e6
            ratio = base / r["ms"] if base else float("nan")
            table.add(name, B, prov, r["ms"], gbps, 100 * gbps / ceil.copy_gbps, ratio)
            row = {
                "vocab": name,
                "V": V,
                "B": B,
                "provider": prov,
                "ms": r["ms"],
                "gb_s": gbps,
                "x_torch": ratio,
            }
            rows.append({**row, "rows_differing": differ})
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    record = {"copy_gbps": ceil.copy_gbps, "rows": rows}
    finish("bench_inverse_cdf", [table], record)
    return record


if __name__ == "__main__":
    main()
