"""`r1core plan`: parameter counts from ModelArgs, the memory / communication / bubble formulas with
hand-computed values, and the estimates against what was measured (benchmarks/RESULTS.md section 3)
and published (DeepSeek-V3 on 2048 H800)."""

from __future__ import annotations

import json

import pytest

from r1core.model import presets
from r1core.model.params import parameter_breakdown
from r1core.parallel import ParallelConfig
from r1core.parallel.plan import (
    GIB,
    Hardware,
    Workload,
    bubble_units,
    deepseek_v3_mfu,
    estimate,
    flops_per_token,
    in_flight,
    layer_activation_elems,
    main,
    param_counts,
    plan,
)


@pytest.mark.parametrize("preset", ["tiny", "small", "v2_lite", "v3"])
def test_parameter_counts_from_args_equal_the_module_built_on_the_meta_device(preset):
    args, c = presets[preset], param_counts(presets[preset])
    ref = parameter_breakdown(args)
    assert (c.total, c.active, c.mtp, c.mtp_unique) == (ref.total, ref.active, ref.mtp, ref.mtp_unique)


def test_v3_counts_match_deepseek_v3_published_671b_total_37b_active_14b_mtp():
    c = param_counts(presets["v3"])
    assert c.total / 1e9 == pytest.approx(671, rel=0.005)
    assert c.active / 1e9 == pytest.approx(37, rel=0.02)
    assert c.mtp / 1e9 == pytest.approx(14, rel=0.05)


def test_flops_per_token_by_hand_at_the_tiny_preset():
    a = presets["tiny"]
    c = param_counts(a)
    # main model without embedding: 1 dense layer + 3 MoE layers with 2 of 8 experts active, plus the head
    expert = 3 * 128 * 64
    main_matmul = c.total - 512 * 128 - 3 * 6 * expert
    mtp_matmul = c.mtp_unique - 6 * expert + 512 * 128  # MTP's block (2 of 8 experts) and its head pass
    attention = 3 * 2 * 4 * (48 + 32) * (16 + 1) / 2 * 5  # fwd+bwd, QK^T and AV, causal half, 4 + 1 MTP
    assert flops_per_token(a, 16) == 6 * (main_matmul + mtp_matmul) + attention


def test_deepseek_v3_gpu_hours_imply_about_39_percent_mfu():
    # 260.7 GFLOP/token x 14.8T tokens / (2.788M H800-hours x 3600 s x 989 TFLOP/s dense BF16)
    fpt = flops_per_token(presets["v3"], 4096)
    assert fpt / 1e9 == pytest.approx(260.7, abs=0.1)
    assert deepseek_v3_mfu() == pytest.approx(fpt * 14.8e12 / (2.788e6 * 3600 * 989e12))
    assert deepseek_v3_mfu() == pytest.approx(0.39, abs=0.005)
    assert deepseek_v3_mfu(gpu_hours=2.664e6) == pytest.approx(0.407, abs=0.005)  # pre-training hours alone


def test_activation_elements_per_token_by_hand_at_the_tiny_preset():
    a = presets["tiny"]  # D 128, 4 heads, q 64, kv 32, qk 32+16, v 32, inter 256, 8 experts top-2 of 64
    mla = 2 * 128 + 2 * 64 + 2 * 32 + 2 * 4 * 48 + 2 * 4 * 32  # 1088
    assert layer_activation_elems(a, dense=True) == mla + 2 * 128 + 3 * 256  # 2112
    assert layer_activation_elems(a, dense=False) == mla + 2 * 128 + 8 * 2 + 2 * 2 * 128 + 3 * 2 * 64 + 3 * 64
    mla_tp2_sp = 128 + 2 * 64 + 2 * 32 + (2 * 4 * 48 + 2 * 4 * 32) / 2  # latent ranks are not split
    assert layer_activation_elems(a, dense=True, tp=2, sp=True) == mla_tp2_sp + 128 + 3 * 256 / 2


@pytest.mark.parametrize(
    "schedule, virtual, flight, bubble",
    [
        ("1f1b", 2, 4, 3 * 3),  # pp micro-batches; (pp-1)(F+B)
        ("interleaved", 2, 4 * (1 + 3 / 8), 4.5),  # pp(1 + (pp-1)/(pp v)); (pp-1)(F+B)/v
        ("dualpipev", 2, 5, 1.0),  # pp+1; (pp/2-1)(F&B + B - 3W) over half-rank chunks
    ],
)
def test_in_flight_micro_batches_and_bubble_by_schedule_at_pp4(schedule, virtual, flight, bubble):
    cfg = ParallelConfig(pp=4, pp_schedule=schedule, pp_virtual=virtual, microbatches=8)
    assert in_flight(cfg, 8) == pytest.approx(flight)
    assert bubble_units(cfg) == pytest.approx(bubble)
    assert in_flight(cfg, 2) == 2  # never more than there are micro-batches
    if schedule == "1f1b":
        assert [in_flight(cfg, 8, r) for r in range(4)] == [4, 3, 2, 1]  # the last rank holds one


def test_memory_and_communication_by_hand_for_tiny_on_two_ranks():
    a = presets["tiny"]
    c = param_counts(a)
    P = c.total + c.mtp_unique  # one rank holds everything once (the MTP shares the embedding and head)
    wl = Workload(seq_len=16, global_batch=2, micro_batch=1)
    zero = estimate(a, ParallelConfig(dp=2), Hardware(gpus=2, reserve_gib=0), wl)
    hand = {"weights": 2 * P, "grads": 2 * P, "master": 8 * P, "optimizer": 8 * P / 2}
    for k, v in hand.items():
        assert zero.mem[k] * GIB == pytest.approx(v), k
    assert zero.comm_gb["dp"] == pytest.approx(2 * (1 / 2) * P * 2 / 1e9)  # reduce-scatter + all-gather
    tp2 = estimate(a, ParallelConfig(tp=2, dp=1), Hardware(gpus=2), wl)
    # 4 + 1 MTP layers x 2 micro-batches x 4 all-reduces x 2(t-1)/t x 16 tokens x 128 x 2 bytes
    assert tp2.comm_gb["tp"] == pytest.approx(5 * 2 * 4 * 1 * 16 * 128 * 2 / 1e9)
    ep2 = estimate(a, ParallelConfig(ep=2, dp=2), Hardware(gpus=2), wl)
    # 3 + 1 MoE layers x 1 micro-batch x 4 all-to-alls x (ep-1)/ep x 16 tokens x top-2 x 128 x 2 bytes
    assert ep2.comm_gb["ep"] == pytest.approx(4 * 1 * 4 * 0.5 * 16 * 2 * 128 * 2 / 1e9)
    # dense parameters over dp = 2; each expert shard has dp / ep = 1 replica, so no expert traffic
    assert ep2.comm_gb["dp"] == pytest.approx(2 * (1 / 2) * (P - 4 * 8 * c.expert) * 2 / 1e9)


@pytest.mark.parametrize(
    "ac, master, measured_gib, rel",
    [
        (False, False, 23.3, 0.06),  # compile
        (False, True, 44.5, 0.06),  # compile + fp32 master weights
        (True, False, 16.9, 0.10),  # compile + activation checkpointing
    ],
)
def test_small_preset_one_gpu_memory_is_within_a_few_percent_of_the_measured_peak(
    ac, master, measured_gib, rel
):
    # benchmarks/RESULTS.md section 3: small preset, one H100, B4 x T2048 bf16, peak torch.cuda memory
    wl = Workload(seq_len=2048, global_batch=4, micro_batch=4, master_weights=master)
    est = estimate(
        presets["small"],
        ParallelConfig(dp=1, activation_checkpointing=ac),
        Hardware(gpus=1, reserve_gib=0),
        wl,
    )
    assert est.mem_total == pytest.approx(measured_gib, rel=rel)


@pytest.mark.parametrize("peak, mfu, measured_ms", [(736, 0.295, 135.1), (789, 0.359, 104)])
def test_small_preset_one_gpu_step_time_at_the_measured_mfu_is_the_measured_step(peak, mfu, measured_ms):
    # RESULTS.md section 3 (compiled step, 736 TFLOP/s peak) and its 2026-12-06 re-measurement: the same FLOP
    # count per token as bench_train's MFU, so only the rounding of the published figures separates them
    wl = Workload(seq_len=2048, global_batch=4, micro_batch=4, master_weights=False)
    est = estimate(presets["small"], ParallelConfig(dp=1), Hardware(gpus=1, peak_tflops=peak, mfu=mfu), wl)
    assert est.step_s * 1e3 == pytest.approx(measured_ms, rel=0.01)


def test_deepseek_v3_published_layout_fits_80gb_only_with_recomputation_under_r1cores_activation_count():
    # 2048 H800, PP16 x EP64 x DP128, ZeRO-1 (sharded fp32 masters, BF16 AdamW moments), 15360 x 4096
    hw = Hardware(gpus=2048, overlap=1.0, mfu=0.39)
    wl = Workload(seq_len=4096, global_batch=15360, shard_master=True, moment_bytes=2, dispatch_bytes=1)
    layout = {"pp": 16, "ep": 64, "dp": 128, "pp_schedule": "dualpipev", "microbatches": 120}
    full = estimate(presets["v3"], ParallelConfig(**layout), hw, wl)
    ac = estimate(presets["v3"], ParallelConfig(**layout, activation_checkpointing=True), hw, wl)
    assert not full.fits and ac.fits  # DeepSeek fits without it: selective recompute + FP8 activation caching
    assert full.mem["weights"] + full.mem["grads"] + full.mem["master"] + full.mem["optimizer"] < 20
    # communication hidden (DualPipe), compute at 39%: the bubble alone keeps the estimate just under it
    assert 0.37 < full.mfu < 0.39
    assert "not divisible" in full.runnable  # 61 layers over 32 stages: r1core's check_layout refuses it


def test_plan_ranks_layouts_that_fit_first_fastest_first():
    ests = plan(presets["small"], Hardware(gpus=8, gpu_mem_gib=20), Workload(seq_len=2048, global_batch=64))
    fit = [e for e in ests if e.fits]
    assert fit and len(fit) < len(ests)
    assert [e.step_s for e in fit] == sorted(e.step_s for e in fit)
    assert all(e.mem_total <= 20 for e in fit) and all(not e.fits for e in ests[len(fit) :])


def test_cli_prints_a_table_and_json_last_and_names_an_unknown_setting(capsys):
    main(["model=tiny", "gpus=4", "seq_len=64", "global_batch=8", "pp=2", "top=3"])
    out = capsys.readouterr().out.strip().splitlines()
    record = json.loads(out[-1])
    assert record["model"] == "tiny" and record["fixed"] == {"pp": 2} and len(record["layouts"]) <= 3
    assert all(r["pp"] == 2 for r in record["layouts"])
    with pytest.raises(SystemExit, match="gpu=8: unknown setting"):
        main(["gpu=8"])
    with pytest.raises(SystemExit, match=r"mfu=1.5 \(must be in \[0, 1\]\)"):
        main(["mfu=1.5"])
