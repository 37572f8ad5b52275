"""Load and save HF DeepSeek-V3 checkpoints (the released safetensors layout, bf16 or block FP8).

Loading never holds the checkpoint in memory: the model is built on the meta device, allocated
with `to_empty` on the target device and dtype, then filled tensor by tensor with one shard open
at a time (stacked expert tensors slice by slice). Every name is checked before any byte is read
(unknown or missing tensors), every shape as it is read, and at the end every parameter and
persistent buffer must have been written exactly once; any failure raises a CheckpointError
naming the tensor, key or file, and no model is returned.

Saving writes `config.json`, `model-0000X-of-0000N.safetensors` shards and
`model.safetensors.index.json` with the released names into a temporary directory beside the
target, fsyncs them, and only then renames it into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import warnings
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from r1core.model.args import ModelArgs, model_shape_diff
from r1core.model.moe import Gate
from r1core.model.transformer import Transformer

from .atomic import fsync_path
from .fp8 import FP8_DTYPE, dequantize_block_fp8
from .hf_config import CheckpointError, HFExtras, args_from_hf_config, hf_config_from_args, parse_hf_config
from .hf_names import IGNORED_HF, Target, hf_to_r1, mtp_copies, r1_to_hf, save_plan

__all__ = [
    "CheckpointError",
    "args_from_hf_config",
    "check_pretrained",
    "hf_config_from_args",
    "hf_model_args",
    "from_pretrained",
    "save_pretrained",
]

SCALE_SUFFIX = "_scale_inv"  # `...weight` -> `...weight_scale_inv`
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FP32_STATE = "e_score_correction_bias"  # routing bias: fp32 whatever the weights' dtype (as HF keeps it)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


@contextmanager
def _open(file: Path):
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError: truncated file, corrupt header
        raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from e
    with handle as f:
        yield f


def _weight_map(path: Path) -> dict[str, Path]:
    """HF tensor name -> shard file, from the index (or the single-file layout)."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: has no weight_map")
        files = {name: path / fname for name, fname in weight_map.items()}
    elif (path / SINGLE_FILE).is_file():
        with _open(path / SINGLE_FILE) as f:
            files = dict.fromkeys(f.keys(), path / SINGLE_FILE)
    else:
        raise CheckpointError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
    missing = sorted({str(f) for f in files.values() if not f.is_file()})
    if missing:
        raise CheckpointError(f"{index}: points to missing shard file(s) {missing}")
    return files


def _empty_model(args: ModelArgs, dtype: torch.dtype, device: torch.device) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.to(dtype=dtype)
    for gate in model.modules():
        if isinstance(gate, Gate):  # routing state stays fp32, like the released checkpoint keeps it
            for name in ("e_score_correction_bias", "expert_load"):
                if getattr(gate, name) is not None:
                    setattr(gate, name, getattr(gate, name).float())
    model.to_empty(device=device)
    if args.tie_embeddings:  # to_empty re-creates each module's parameter, which unties them
        model.head.weight = model.embed.weight
    persistent = set(model.state_dict())
    for name, buf in model.named_buffers():
        if name in persistent:
            continue
        if not name.endswith("expert_load"):
            raise NotImplementedError(
                f"non-persistent buffer {name} has no initializer in the checkpoint loader"
            )
        buf.zero_()
    return model


class _Loader:
    def __init__(self, model: Transformer, files: dict[str, Path], extras: HFExtras):
        self.args: ModelArgs = model.args
        self.files, self.extras = files, extras
        self.dest = model.state_dict(keep_vars=True)
        if self.args.tie_embeddings:
            del self.dest["head.weight"]  # the same tensor as embed.weight
        self.count = defaultdict(int)  # (r1core key, index) -> times written

    def _target(self, t: Target) -> torch.Tensor:
        return self.dest[t.name].detach()[t.index]

    def _plan(self) -> tuple[dict[Path, list[tuple[str, Target]]], list[tuple[str, Target]]]:
        """Map every checkpoint name before reading anything: unknown and missing names fail here."""
        by_file, copies, unexpected = defaultdict(list), [], []
        for hf, file in self.files.items():
            if hf.endswith(SCALE_SUFFIX):
                if hf[: -len(SCALE_SUFFIX)] not in self.files:
                    raise CheckpointError(f"{file}: {hf} has no weight {hf[: -len(SCALE_SUFFIX)]}")
                continue
            if IGNORED_HF.fullmatch(hf):
                continue
            t = hf_to_r1(hf, self.args)
            if (
                t is None
                or t.name not in self.dest
                or any(i >= n for i, n in zip(t.index, self.dest[t.name].shape))
            ):
                unexpected.append(hf)
            else:
                (copies if t.copy else by_file[file]).append((hf, t))
        if unexpected:
            raise CheckpointError(
                f"checkpoint tensor(s) with no place in r1core for this config.json (num_hidden_layers="
                f"{self.args.n_layers}, num_nextn_predict_layers={self.args.n_mtp_modules}, q_lora_rank="
                f"{self.args.q_lora_rank or None}): {sorted(unexpected)[:8]}"
                f"{' ...' if len(unexpected) > 8 else ''}"
            )
        optional = {hf for hf, _ in mtp_copies(self.args)}
        missing = sorted(
            hf for hf, _, _ in save_plan(self.dest, self.args) if hf not in self.files and hf not in optional
        )
        if missing:
            more = " ..." if len(missing) > 8 else ""
            raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s): {missing[:8]}{more}")
        return by_file, copies

    def _read(self, f, file: Path, hf: str, t: Target, keys: set[str], scale: torch.Tensor | None = None):
        """One tensor from an open shard, shape-checked and dequantized; the scale may come from elsewhere."""
        if hf not in keys:
            raise CheckpointError(f"{file}: the index lists {hf} but the file lacks it")
        dest = self._target(t)
        shape = list(f.get_slice(hf).get_shape())
        if shape != list(dest.shape):
            raise CheckpointError(
                f"{file}: tensor {hf} has shape {shape}, r1core {t.name} expects {list(dest.shape)}"
            )
        value = f.get_tensor(hf)
        if scale is None and hf + SCALE_SUFFIX in keys:
            scale = f.get_tensor(hf + SCALE_SUFFIX)
        if value.dtype == FP8_DTYPE:
            if scale is None:
                raise CheckpointError(f"{file}: {hf} is float8_e4m3fn but {hf}{SCALE_SUFFIX} is missing")
            try:
                return dequantize_block_fp8(
                    value.to(dest.device), scale, self.extras.weight_block_size, dest.dtype
                )
            except ValueError as e:
                raise CheckpointError(f"{file}: {hf}{SCALE_SUFFIX}: {e}") from e
        if scale is not None:
            raise CheckpointError(
                f"{file}: {hf}{SCALE_SUFFIX} given for a {value.dtype} weight (only float8_e4m3fn is scaled)"
            )
        if not value.is_floating_point():
            raise CheckpointError(
                f"{file}: tensor {hf} has dtype {value.dtype}, expected a floating-point tensor"
            )
        return value

    def _read_alone(self, hf: str, t: Target) -> torch.Tensor:
        """A tensor whose scale sits in another shard: read the scale first, then the weight."""
        scale, scale_file = None, self.files.get(hf + SCALE_SUFFIX)
        if scale_file is not None and scale_file != self.files[hf]:
            with _open(scale_file) as f:
                if hf + SCALE_SUFFIX not in set(f.keys()):
                    raise CheckpointError(
                        f"{scale_file}: the index lists {hf}{SCALE_SUFFIX} but the file lacks it"
                    )
                scale = f.get_tensor(hf + SCALE_SUFFIX)
        with _open(self.files[hf]) as f:
            return self._read(f, self.files[hf], hf, t, set(f.keys()), scale)

    def _fill(self, t: Target, value: torch.Tensor) -> None:
        self._target(t).copy_(value)  # copy_ casts to the parameter's dtype and device
        self.count[t.name, t.index] += 1

    @torch.no_grad()
    def run(self) -> None:
        by_file, copies = self._plan()
        split = []
        for file, items in by_file.items():
            with _open(file) as f:
                keys = set(f.keys())
                for hf, t in items:
                    if self.files.get(hf + SCALE_SUFFIX, file) != file:
                        split.append((hf, t))
                    else:
                        self._fill(t, self._read(f, file, hf, t, keys))
        for hf, t in split:
            self._fill(t, self._read_alone(hf, t))
        self._check_complete()
        self._verify_copies(copies)

    def check(self) -> None:
        """Every shard's header, and every mapped tensor's presence, shape and dtype; reads no weights."""
        by_file, copies = self._plan()
        for hf, t in copies:
            by_file[self.files[hf]].append((hf, t))
        for file in sorted(set(self.files.values())):
            with _open(file) as f:
                keys = set(f.keys())
                for hf, t in by_file.get(file, []):
                    if hf not in keys:
                        raise CheckpointError(f"{file}: the index lists {hf} but the file lacks it")
                    info = f.get_slice(hf)
                    shape, dtype, expected = (
                        list(info.get_shape()),
                        info.get_dtype(),
                        list(self._target(t).shape),
                    )
                    if shape != expected:
                        raise CheckpointError(
                            f"{file}: tensor {hf} has shape {shape}, r1core {t.name} expects {expected}"
                        )
                    if dtype not in _WEIGHT_DTYPES:
                        raise CheckpointError(
                            f"{file}: tensor {hf} has dtype {dtype}, expected one of {sorted(_WEIGHT_DTYPES)}"
                        )
                    if dtype == "F8_E4M3" and hf + SCALE_SUFFIX not in self.files:
                        raise CheckpointError(
                            f"{file}: {hf} is float8_e4m3fn but {hf}{SCALE_SUFFIX} is missing"
                        )

    def _check_complete(self) -> None:
        expected = [(key, index) for key in self.dest for _, index in r1_to_hf(key, self.args)]
        bad = [
            f"{key}[{', '.join(map(str, index))}]" if index else key
            for key, index in expected
            if self.count[key, index] != 1
        ]
        if bad:
            raise CheckpointError(f"r1core tensor(s) not written exactly once: {bad[:8]}")

    def _verify_copies(self, copies: list[tuple[str, Target]]) -> None:
        for hf, t in copies:
            value, main = self._read_alone(hf, t), self._target(t)
            if not torch.equal(value.to(main.device, main.dtype), main):
                diff = (value.to(main.device).float() - main.float()).abs().max().item()
                warnings.warn(
                    f"checkpoint tensor {hf} differs from {t.name} (max |diff| {diff:.3g}); "
                    f"r1core shares the main model's {t.name}",
                    stacklevel=3,
                )


def hf_model_args(path, drop_missing_mtp: bool = True) -> tuple[ModelArgs, HFExtras, dict[str, Path]]:
    """The ModelArgs an HF DeepSeek-V3 / V2 directory holds, read from its config.json and its shard index
    only (no weights): (args, extras, HF name -> shard file).

    transformers' own `save_pretrained` writes no MTP layer while its config keeps
    `num_nextn_predict_layers: 1`; such a checkpoint gets `n_mtp_modules=0` and a warning, unless
    `drop_missing_mtp=False`, in which case the load fails naming the missing tensors.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (an HF checkpoint is a directory with config.json)")
    args, extras = parse_hf_config(_read_json(path / "config.json"))
    files = _weight_map(path)
    if (
        args.n_mtp_modules
        and drop_missing_mtp
        and not any(n.startswith(f"model.layers.{args.n_layers}.") for n in files)
    ):
        warnings.warn(
            f"{path}: config has num_nextn_predict_layers={args.n_mtp_modules} but the checkpoint has no "
            "MTP weights (transformers does not save them); loading without multi-token prediction",
            stacklevel=2,
        )
        args = args.replace(n_mtp_modules=0)
    return args, extras, files


def from_pretrained(
    path, dtype: torch.dtype | None = torch.float32, device=None, *, drop_missing_mtp: bool = True
) -> Transformer:
    """A Transformer (in eval mode, like transformers' from_pretrained) from an HF DeepSeek-V3 / V2 directory.

    FP8 weights are dequantized to `dtype`; `e_score_correction_bias` stays fp32. A checkpoint whose
    config promises MTP layers but holds none (transformers' own save drops them) loads without MTP
    and warns; `drop_missing_mtp=False` makes that an error instead.
    """
    args, extras, files = hf_model_args(path, drop_missing_mtp)
    model = _empty_model(args, dtype or torch.float32, torch.device(device if device is not None else "cpu"))
    _Loader(model, files, extras).run()
    return model.eval()


# safetensors dtype names of the tensors a DeepSeek checkpoint may hold
_WEIGHT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3"})


def check_pretrained(path, args: ModelArgs | None = None) -> ModelArgs:
    """Validate an HF checkpoint directory without reading its weights: config.json, the index, every
    shard's header (a truncated or corrupt file fails here), every tensor's name, shape and dtype.

    With `args`, the checkpoint must hold exactly that model. Returns the checkpoint's ModelArgs;
    raises CheckpointError naming the file (and tensor) at fault.
    """
    found, extras, files = hf_model_args(path, drop_missing_mtp=args is None or args.n_mtp_modules == 0)
    if args is not None:
        diff = model_shape_diff(args, found)
        if diff:
            raise CheckpointError(
                f"{Path(path) / 'config.json'}: differs from the job's model in "
                + ", ".join(f"{k} (job {a}, checkpoint {b})" for k, (a, b) in sorted(diff.items()))
            )
    with torch.device("meta"):
        model = Transformer(found)
    _Loader(model, files, extras).check()
    return found


# ---------------------------------------------------------------- saving


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    fsync_path(path)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`; an existing `out` is set aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)  # put the previous checkpoint back
        raise
    fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old)


def _check_saveable(model: Transformer, state: dict) -> None:
    args = model.args
    complete = (
        model.embed is not None
        and model.norm is not None
        and model.head is not None
        and len(model.layers) == args.n_layers
        and len(model.mtp) == args.n_mtp_modules
    )
    if not complete:
        raise CheckpointError(
            "save_pretrained needs the whole model (a pipeline stage holds only part of it)"
        )
    sharded = [k for k, t in state.items() if type(t) is not torch.Tensor]
    if sharded:
        raise CheckpointError(
            f"save_pretrained needs plain tensors; gather sharded ones first: {sharded[:4]}"
        )


def _shards(plan, nbytes, max_shard_bytes: int) -> list[list]:
    shards, size = [[]], 0
    for entry in plan:
        n = nbytes(entry)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


def save_pretrained(
    model: Transformer, out_dir, max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None
) -> Path:
    """Write `model` as an HF DeepSeek-V3 checkpoint directory; returns its path.

    `dtype` casts the weights (default: as they are); `e_score_correction_bias` is always fp32.
    The MTP layers are written with their copies of the embedding and head, as the release does.
    An existing `out_dir` is replaced, but only once the new checkpoint is complete on disk.
    """
    out = Path(out_dir).absolute()
    state = model.state_dict()
    _check_saveable(model, state)
    plan = save_plan(state, model.args)

    def tensor(key: str, index: tuple[int, ...]) -> torch.Tensor:
        t = state[key][index]
        to = torch.float32 if key.endswith(FP32_STATE) else (dtype or t.dtype)
        return t.detach().to("cpu", to).clone()  # clone: safetensors refuses tensors sharing storage

    def nbytes(entry) -> int:
        t = state[entry[1]][entry[2]]
        return t.numel() * (4 if entry[1].endswith(FP32_STATE) else (dtype or t.dtype).itemsize)

    config = hf_config_from_args(model.args)
    saved_dtype = str(dtype or model.embed.weight.dtype).removeprefix("torch.")
    config.update(torch_dtype=saved_dtype, dtype=saved_dtype)
    shards = _shards(plan, nbytes, max_shard_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_json(tmp / "config.json", config)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(
                {hf: tensor(key, e) for hf, key, e in shard}, str(tmp / fname), metadata={"format": "pt"}
            )
            fsync_path(tmp / fname)
            weight_map.update(dict.fromkeys((hf for hf, _, _ in shard), fname))
        total = sum(nbytes(entry) for entry in plan)
        _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        fsync_path(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
