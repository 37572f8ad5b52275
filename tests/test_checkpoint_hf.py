"""HF DeepSeek-V3 checkpoints: parity with transformers both ways, FP8 dequant, MTP round trip, bad input."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import r1core
from r1core.checkpoint import CheckpointError, args_from_hf_config, hf_config_from_args
from r1core.checkpoint import hf as hf_ckpt
from r1core.model import ModelArgs, Transformer, presets

transformers = pytest.importorskip("transformers")
INDEX = "model.safetensors.index.json"
VOCAB, LAYERS = 96, 3
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,
}

# DeepSeek-V3's released config.json (deepseek-ai/DeepSeek-V3, also R1), verbatim.
V3_RELEASE = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}
# DeepSeek-V2-Lite's released config.json: softmax routing without groups, no q compression, no MTP.
V2_LITE_RELEASE = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}
TRAINING_ONLY = ("bias_update_speed", "seq_aux_alpha", "mtp_loss_weight", "moe_impl")


# ------------------------------------------------------------------------------------------ helpers


def _hf_model(n_group: int, q_lora_rank: int | None):
    cfg = transformers.DeepseekV3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=n_group,
        topk_group=n_group // 2,
        first_k_dense_replace=1,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=256,
        rope_parameters=dict(YARN),
        num_nextn_predict_layers=1,
        attn_implementation="eager",
    )
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # O(1) weights so routing and attention are far from degenerate
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def _r1_args(q_lora_rank: int = 32, tie: bool = False) -> ModelArgs:
    return ModelArgs(
        vocab_size=VOCAB,
        dim=64,
        inter_dim=96,
        moe_inter_dim=32,
        n_layers=LAYERS,
        n_dense_layers=1,
        n_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        n_activated_experts=2,
        n_expert_groups=4,
        n_limited_groups=2,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_seq_len=256,
        original_seq_len=64,
        rope_factor=4.0,
        mscale=1.0,
        mscale_all_dim=0.8,
        n_mtp_modules=1,
        tie_embeddings=tie,
    )


def _r1_model(args: ModelArgs) -> Transformer:
    model = Transformer(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
        for gate in model.moe_layers():
            gate.gate.e_score_correction_bias.copy_(0.1 * torch.randn(args.n_routed_experts))
    return model


def _assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours - ref).abs()
    assert ref.std() > 0.5, "degenerate logits make the comparison meaningless"
    assert err.max() <= 1e-4, f"max abs err {err.max():.3g}, mean {err.mean():.3g}"


def _weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / INDEX).read_text())["weight_map"]


def _add_shard(path: Path, tensors: dict[str, torch.Tensor], fname: str = "model-extra.safetensors") -> None:
    save_file(tensors, str(path / fname), metadata={"format": "pt"})
    index = json.loads((path / INDEX).read_text())
    index["weight_map"].update(dict.fromkeys(tensors, fname))
    (path / INDEX).write_text(json.dumps(index))


def _rewrite(path: Path, fn) -> None:
    """Apply fn(name, tensor) -> {name: tensor} to every tensor, keeping shards and index consistent."""
    index = json.loads((path / INDEX).read_text())
    new_map = {}
    for fname in sorted(set(index["weight_map"].values())):
        out = {}
        for name, t in load_file(str(path / fname)).items():
            out.update(fn(name, t))
        save_file(out, str(path / fname), metadata={"format": "pt"})
        new_map.update(dict.fromkeys(out, fname))
    index["weight_map"] = new_map
    (path / INDEX).write_text(json.dumps(index))


def _mtp_release_tensors(path: Path) -> dict[str, torch.Tensor]:
    """An MTP layer in the release layout, built from the last HF layer's names (not from r1core's tables)."""
    last, mtp, tensors = f"model.layers.{LAYERS - 1}.", f"model.layers.{LAYERS}.", {}
    for name, fname in _weight_map(path).items():
        if name.startswith(last):
            with safe_open(str(path / fname), "pt") as f:
                tensors[mtp + name[len(last) :]] = torch.randn(f.get_slice(name).get_shape())
    main = {}
    for fname in set(_weight_map(path).values()):
        main.update(load_file(str(path / fname)))
    d = main["model.norm.weight"].numel()
    tensors.update(
        {
            mtp + "enorm.weight": torch.randn(d),
            mtp + "hnorm.weight": torch.randn(d),
            mtp + "eh_proj.weight": torch.randn(d, 2 * d),
            mtp + "shared_head.norm.weight": torch.randn(d),
            mtp + "embed_tokens.weight": main["model.embed_tokens.weight"].clone(),
            mtp + "shared_head.head.weight": main["lm_head.weight"].clone(),
        }
    )
    return tensors


@pytest.fixture(scope="module")
def r1_ckpt(tmp_path_factory) -> tuple[Path, Transformer]:
    torch.manual_seed(1)
    model = _r1_model(_r1_args())
    path = tmp_path_factory.mktemp("r1") / "ckpt"
    hf_ckpt.save_pretrained(model, path, max_shard_bytes=200_000)
    return path, model


@pytest.fixture
def ckpt(r1_ckpt, tmp_path) -> Path:
    """A private copy of the r1core-written checkpoint for tests that damage it."""
    return Path(shutil.copytree(r1_ckpt[0], tmp_path / "ckpt"))


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("n_group, q_lora_rank", [(2, 32), (4, None)])
def test_transformers_checkpoint_loads_with_equal_logits_and_mtp(tmp_path, n_group, q_lora_rank):
    hf = _hf_model(n_group, q_lora_rank)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    mtp = _mtp_release_tensors(tmp_path)  # transformers drops MTP layers on save; the release keeps them
    _add_shard(tmp_path, mtp)
    model = r1core.from_pretrained(tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        _assert_logits_close(model(tokens), hf(tokens).logits)
    k = f"model.layers.{LAYERS}."
    m = model.mtp[0]
    assert torch.equal(m.eh_proj.weight, mtp[k + "eh_proj.weight"])
    assert torch.equal(m.norm.weight, mtp[k + "shared_head.norm.weight"])
    assert torch.equal(m.block.ffn.experts.w2[5], mtp[k + "mlp.experts.5.down_proj.weight"])
    assert torch.equal(m.block.ffn.experts.w3[7], mtp[k + "mlp.experts.7.up_proj.weight"])
    assert torch.equal(m.block.attn.wkv_b.weight, mtp[k + "self_attn.kv_b_proj.weight"])
    assert torch.equal(m.block.ffn.gate.e_score_correction_bias, mtp[k + "mlp.gate.e_score_correction_bias"])


@pytest.mark.parametrize("q_lora_rank, tie", [(32, False), (0, True)])
def test_r1core_checkpoint_loads_in_transformers_with_equal_logits(tmp_path, q_lora_rank, tie):
    model = _r1_model(_r1_args(q_lora_rank, tie))
    r1core.save_pretrained(model, tmp_path / "out")  # the package-level API the README shows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers reports the MTP layer as unexpected keys
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
            tmp_path / "out", attn_implementation="eager", dtype=torch.float32
        ).eval()
    tokens = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        _assert_logits_close(hf(tokens).logits, model(tokens))


def test_save_writes_release_layout_and_round_trips_exactly(r1_ckpt):
    path, model = r1_ckpt
    weight_map = _weight_map(path)
    shards = sorted(set(weight_map.values()))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in path.iterdir()) == sorted(["config.json", INDEX, *shards])
    mtp = f"model.layers.{LAYERS}."
    for name in (
        "model.layers.1.mlp.experts.7.down_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        mtp + "shared_head.head.weight",
        mtp + "embed_tokens.weight",
        mtp + "enorm.weight",
        mtp + "mlp.experts.0.gate_proj.weight",
        mtp + "mlp.gate.e_score_correction_bias",
    ):
        assert name in weight_map, name
    with safe_open(str(path / weight_map[mtp + "shared_head.head.weight"]), "pt") as f:
        assert torch.equal(f.get_tensor(mtp + "shared_head.head.weight"), model.head.weight)
    loaded = r1core.from_pretrained(path)
    ref = model.state_dict()
    assert loaded.state_dict().keys() == ref.keys()
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, ref[name]), name


def test_bf16_save_and_load_keep_routing_bias_fp32(r1_ckpt, tmp_path):
    _, model = r1_ckpt
    hf_ckpt.save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "bf16" / "model-00001-of-00001.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
    loaded = r1core.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    bias = loaded.layers["1"].ffn.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(
        bias, model.layers["1"].ffn.gate.e_score_correction_bias
    )
    assert loaded.layers["1"].ffn.experts.w1.dtype == torch.bfloat16
    assert torch.equal(loaded.layers["1"].ffn.experts.w1, model.layers["1"].ffn.experts.w1.bfloat16())


# ------------------------------------------------------------------------------------------ FP8


def _quantize_block_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The test's own quantizer: per-block amax / 448 scale, edge blocks partial."""
    rows, cols = w.shape
    scale = torch.empty(-(-rows // block[0]), -(-cols // block[1]))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            scale[i, j] = blk.abs().max() / 448.0
            q[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (blk / scale[i, j]).to(
                torch.float8_e4m3fn
            )
    return q, scale


def _dequantize_ref(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rs, cs = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rs, cs] = q[rs, cs].float() * scale[i, j]
    return out


def _to_fp8_checkpoint(path: Path, block_cfg: list[int] | None) -> dict[str, torch.Tensor]:
    """Quantize every linear weight of the layers as the release does; return the dequantized references."""
    block = tuple(block_cfg or (128, 128))
    refs = {}

    def quantize(name, t):
        skip = ("mlp.gate.weight", "embed_tokens", "shared_head.head")  # kept in bf16 by the release
        if not name.startswith("model.layers.") or t.dim() != 2 or any(s in name for s in skip):
            return {name: t}
        q, s = _quantize_block_fp8(t, block)
        refs[name] = _dequantize_ref(q, s, block)
        return {name: q, name + "_scale_inv": s}

    _rewrite(path, quantize)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}
    if block_cfg is not None:
        config["quantization_config"]["weight_block_size"] = block_cfg
    (path / "config.json").write_text(json.dumps(config))
    return refs


@pytest.mark.parametrize("block", [[16, 16], [8, 32], None])
def test_fp8_block_weights_dequantize_exactly(ckpt, block):
    refs = _to_fp8_checkpoint(ckpt, block)
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" in refs  # 24 x 64: a partial edge block at 16
    for dtype in (torch.float32, torch.bfloat16):
        model = r1core.from_pretrained(ckpt, dtype=dtype)
        p = dict(model.named_parameters())
        wkv_a = refs["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
        assert torch.equal(model.layers["1"].attn.wkv_a.weight, wkv_a.to(dtype))
        assert torch.equal(
            model.layers["0"].ffn.w2.weight, refs["model.layers.0.mlp.down_proj.weight"].to(dtype)
        )
        assert torch.equal(p["mtp.0.eh_proj.weight"], refs[f"model.layers.{LAYERS}.eh_proj.weight"].to(dtype))
        for e in range(8):
            ref = refs[f"model.layers.2.mlp.experts.{e}.up_proj.weight"].to(dtype)
            assert torch.equal(model.layers["2"].ffn.experts.w3[e], ref)


# ------------------------------------------------------------------------------------------ config


def test_released_v3_config_is_the_v3_preset():
    args = args_from_hf_config(V3_RELEASE)
    assert args == presets["v3"]
    assert args.max_seq_len == 163840 and args.original_seq_len == 4096 and args.rope_factor == 40


def test_released_v2_lite_config_is_the_v2_lite_preset():
    args = args_from_hf_config(V2_LITE_RELEASE)
    assert args == presets["v2_lite"].replace(**{f: getattr(args, f) for f in TRAINING_ONLY})


@pytest.mark.parametrize("name", ["v3", "v2_lite", "tiny", "small"])
def test_presets_round_trip_through_hf_config(name):
    args = presets[name]
    back = args_from_hf_config(json.loads(json.dumps(hf_config_from_args(args))))
    assert back == args.replace(**{f: getattr(back, f) for f in TRAINING_ONLY})


def test_rope_parameters_and_rope_scaling_are_equivalent():
    legacy = hf_config_from_args(_r1_args())
    modern = {k: v for k, v in legacy.items() if k not in ("rope_scaling", "rope_theta")}
    modern["rope_parameters"] = dict(YARN)
    assert args_from_hf_config(modern) == args_from_hf_config(legacy) == _r1_args()


@pytest.mark.parametrize(
    "change, key",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_interleave": False}, "rope_interleave"),
        ({"topk_method": "aux_loss"}, "topk_method"),
        ({"topk_method": "greedy"}, "topk_method"),  # greedy is softmax routing
        ({"quantization_config": {"quant_method": "awq"}}, "quant_method"),
        ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "fmt"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"model_type": "deepseek_v32"}, "model_type"),
        ({"sliding_window": 128}, "sliding_window"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
        ({"rope_scaling": {**V3_RELEASE["rope_scaling"], "mscale_all_dim": None}}, "mscale_all_dim"),
        ({"rope_scaling": {**V3_RELEASE["rope_scaling"], "attention_factor": 1.5}}, "attention_factor"),
        ({"rope_scaling": {**V3_RELEASE["rope_scaling"], "truncate": False}}, "truncate"),
        ({"n_routed_experts": 250}, "n_group"),
        ({"first_k_dense_replace": 62}, "first_k_dense_replace"),
        ({"topk_group": 9}, "topk_group"),
        ({"max_position_embeddings": 4096}, "max_position_embeddings"),
    ],
)
def test_config_rejects_keys_that_change_or_contradict_the_math(change, key):
    with pytest.raises(CheckpointError, match=key):
        args_from_hf_config({**V3_RELEASE, **change})


def test_config_missing_key_is_named():
    config = dict(V3_RELEASE)
    del config["kv_lora_rank"]
    with pytest.raises(CheckpointError, match="missing key 'kv_lora_rank'"):
        args_from_hf_config(config)


# ------------------------------------------------------------------------------------------ bad files


def _damage_one(name: str, fn):
    return lambda n, t: fn(t) if n == name else {n: t}


EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"


def test_missing_tensor_is_named(ckpt):
    _rewrite(ckpt, _damage_one(EXPERT, lambda t: {}))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\).*experts\.3\.up_proj"):
        r1core.from_pretrained(ckpt)


def test_index_entry_without_tensor_in_shard_is_named(ckpt):
    fname = _weight_map(ckpt)[EXPERT]
    tensors = load_file(str(ckpt / fname))
    del tensors[EXPERT]
    save_file(tensors, str(ckpt / fname))
    with pytest.raises(CheckpointError, match=rf"{fname}: the index lists {EXPERT}"):
        r1core.from_pretrained(ckpt)


def test_shape_mismatch_is_named(ckpt):
    _rewrite(ckpt, _damage_one(EXPERT, lambda t: {EXPERT: t[:, :-1].contiguous()}))
    with pytest.raises(
        CheckpointError, match=r"experts\.3\.up_proj\.weight has shape \[32, 63\].*expects \[32, 64\]"
    ):
        r1core.from_pretrained(ckpt)


def test_truncated_shard_is_named(ckpt):
    shard = ckpt / _weight_map(ckpt)[EXPERT]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: cannot read safetensors"):
        r1core.from_pretrained(ckpt)


def test_index_pointing_to_missing_shard_is_named(ckpt):
    shard = ckpt / _weight_map(ckpt)[EXPERT]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"missing shard file.*{shard.name}"):
        r1core.from_pretrained(ckpt)


def test_tensor_without_a_place_is_named(ckpt):
    _add_shard(ckpt, {f"model.layers.{LAYERS + 1}.enorm.weight": torch.ones(64)})
    with pytest.raises(CheckpointError, match=rf"no place in r1core.*model\.layers\.{LAYERS + 1}\.enorm"):
        r1core.from_pretrained(ckpt)


def test_fp8_weight_without_scale_is_named(ckpt):
    _rewrite(ckpt, _damage_one(EXPERT, lambda t: {EXPERT: t.to(torch.float8_e4m3fn)}))
    with pytest.raises(
        CheckpointError, match=rf"{EXPERT} is float8_e4m3fn but {EXPERT}_scale_inv is missing"
    ):
        r1core.from_pretrained(ckpt)


def test_fp8_scale_of_wrong_shape_is_named(ckpt):
    bad_scale = {EXPERT + "_scale_inv": torch.ones(2, 2)}
    _rewrite(ckpt, _damage_one(EXPERT, lambda t: {EXPERT: t.to(torch.float8_e4m3fn), **bad_scale}))
    with pytest.raises(
        CheckpointError, match=rf"{EXPERT}_scale_inv: scale_inv shape \[2, 2\].*expected \[1, 1\]"
    ):
        r1core.from_pretrained(ckpt)


def test_missing_mtp_layer_loads_without_mtp_and_warns_unless_told_to_fail(ckpt):
    _rewrite(ckpt, lambda n, t: {} if n.startswith(f"model.layers.{LAYERS}.") else {n: t})
    with pytest.warns(UserWarning, match="without multi-token prediction"):
        model = r1core.from_pretrained(ckpt)
    assert len(model.mtp) == 0 and model.args.n_mtp_modules == 0
    with pytest.raises(CheckpointError, match=rf"lacks .*model\.layers\.{LAYERS}\."):
        r1core.from_pretrained(ckpt, drop_missing_mtp=False)


def test_mtp_copy_that_differs_from_main_weight_warns(ckpt):
    name = f"model.layers.{LAYERS}.embed_tokens.weight"
    _rewrite(ckpt, _damage_one(name, lambda t: {name: t + 1}))
    with pytest.warns(UserWarning, match=rf"{name} differs from embed.weight"):
        r1core.from_pretrained(ckpt)


# ------------------------------------------------------------------------------------------ atomic save


def test_failed_save_leaves_existing_checkpoint_untouched(r1_ckpt, ckpt, monkeypatch):
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf_ckpt, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        hf_ckpt.save_pretrained(r1_ckpt[1], ckpt, max_shard_bytes=200_000)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]  # no temp dir left behind


def test_save_replaces_an_existing_checkpoint(r1_ckpt, ckpt):
    hf_ckpt.save_pretrained(r1_ckpt[1], ckpt)  # one shard now instead of several
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["config.json", INDEX, "model-00001-of-00001.safetensors"]
    )
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]
    loaded = r1core.from_pretrained(ckpt)
    assert torch.equal(loaded.mtp[0].eh_proj.weight, r1_ckpt[1].mtp[0].eh_proj.weight)


def test_rename_failure_restores_the_previous_checkpoint(r1_ckpt, ckpt, monkeypatch):
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    real_rename = hf_ckpt.os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".ckpt.tmp-"):
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(hf_ckpt.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        hf_ckpt.save_pretrained(r1_ckpt[1], ckpt)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]


def test_load_opens_one_shard_at_a_time_even_with_scales_in_other_shards(ckpt, monkeypatch):
    refs = _to_fp8_checkpoint(ckpt, [16, 16])
    moved = EXPERT + "_scale_inv"  # the scale now lives in a shard of its own
    scale = {moved: load_file(str(ckpt / _weight_map(ckpt)[moved]))[moved]}
    _rewrite(ckpt, lambda n, t: {} if n == moved else {n: t})
    _add_shard(ckpt, scale)
    state = {"open": 0, "max": 0}

    class Tracked:
        def __init__(self, *args, **kwargs):
            self.handle = safe_open(*args, **kwargs)

        def __enter__(self):
            state["open"] += 1
            state["max"] = max(state["max"], state["open"])
            return self.handle.__enter__()

        def __exit__(self, *exc):
            state["open"] -= 1
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(hf_ckpt, "safe_open", Tracked)
    model = r1core.from_pretrained(ckpt)
    assert state == {"open": 0, "max": 1}
    assert torch.equal(model.layers["1"].ffn.experts.w3[3], refs[EXPERT])
