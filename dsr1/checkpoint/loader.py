"""Load a Hugging Face DeepSeek-R1 checkpoint directory into a `Transformer`.

Shards are named by `model.safetensors.index.json` (or one `model.safetensors`) and opened lazily,
memory-mapped: only shards holding tensors this process needs are opened, and each tensor is copied
straight into its parameter on the target device, so host memory never holds a full state dict.
Every expected tensor's presence, shape and dtype is checked before any weight is copied.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from dsr1.checkpoint.fp8 import FP8_DTYPE, dequantize
from dsr1.checkpoint.hf_names import TensorSpec, checkpoint_tensors
from dsr1.config import ModelConfig
from dsr1.model.transformer import Transformer
from dsr1.parallel.dispatch import Dispatcher

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F8_E4M3": FP8_DTYPE}


@dataclass
class LoadStats:
    """What one process read, against the whole checkpoint."""

    tensors_read: int
    bytes_read: int
    tensors_total: int
    bytes_total: int
    shards_opened: int
    shards_total: int

    def summary(self) -> str:
        return (
            f"read {self.tensors_read}/{self.tensors_total} tensors, {self.bytes_read / 2**30:.3f}/{self.bytes_total / 2**30:.3f} GiB "
            f"({self.bytes_read / max(self.bytes_total, 1):.1%}), from {self.shards_opened}/{self.shards_total} shards"
        )


class Checkpoint:
    """A checkpoint directory: its config, and which shard holds each tensor (shards opened on demand)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        self.config = ModelConfig.from_file(self.path / "config.json")
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                raw = json.loads(index.read_text())
                self.weight_map: dict[str, str] = dict(raw["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from e
        elif (self.path / SINGLE_FILE).is_file():
            with self._open(SINGLE_FILE) as f:
                self.weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise FileNotFoundError(f"{self.path} holds neither {INDEX_FILE} nor {SINGLE_FILE}")
        self.shards = sorted(set(self.weight_map.values()))
        self._handles: dict[str, object] = {}

    @property
    def is_fp8(self) -> bool:
        return self.config.quant is not None

    def shard(self, filename: str):
        """The open (memory-mapped) shard `filename`."""
        if filename not in self._handles:
            self._handles[filename] = self._open(filename)
        return self._handles[filename]

    def _open(self, filename: str):
        file = self.path / filename
        if not file.is_file():
            raise FileNotFoundError(f"shard {file} is listed in {INDEX_FILE} but missing")
        try:
            return safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for bad headers and sizes
            raise ValueError(f"shard {file} is truncated or corrupt: {e}") from e

    def total_bytes(self) -> int:
        return sum((self.path / s).stat().st_size for s in self.shards if (self.path / s).is_file())

    def check(self, specs: list[TensorSpec], rank: int = 0) -> None:
        """Every spec is in the index and in its shard with the right shape and dtype; no unknown tensors."""
        cfg = self.config
        known = {s.hf_name for s in checkpoint_tensors(cfg, self.is_fp8, mtp=True)}
        unexpected = [n for n in self.weight_map if n not in known]
        missing = [s for s in specs if s.hf_name not in self.weight_map]
        if missing or unexpected:
            lines = [f"checkpoint {self.path} does not match its config.json:"]
            if missing:
                lines.append(f"  {len(missing)} missing tensors, e.g. " + ", ".join(_describe(s, rank) for s in missing[:5]))
            if unexpected:
                lines.append(f"  {len(unexpected)} unexpected tensors, e.g. {unexpected[:5]}")
                experts = [n for n in unexpected if ".mlp.experts." in n]
                if experts:
                    lines.append(f"  (config.json says n_routed_experts={cfg.n_routed_experts}; the checkpoint has experts beyond that)")
            raise ValueError("\n".join(lines))
        for spec in specs:
            filename = self.weight_map[spec.hf_name]
            f = self.shard(filename)
            try:
                view = f.get_slice(spec.hf_name)
            except Exception as e:
                raise ValueError(f"tensor {spec.hf_name} is listed for shard {filename} but is not in it: {e}") from e
            shape, dtype = tuple(view.get_shape()), SAFETENSORS_DTYPES.get(view.get_dtype(), view.get_dtype())
            if shape != spec.shape or dtype != spec.dtype:
                raise ValueError(
                    f"tensor {spec.hf_name} in shard {filename}: expected shape {list(spec.shape)} dtype {spec.dtype}, "
                    f"found shape {list(shape)} dtype {dtype}"
                )

    def read(self, spec: TensorSpec) -> torch.Tensor:
        filename = self.weight_map[spec.hf_name]
        try:
            return self.shard(filename).get_tensor(spec.hf_name)
        except Exception as e:
            raise ValueError(f"could not read tensor {spec.hf_name} from shard {self.path / filename}: {e}") from e


def _describe(spec: TensorSpec, rank: int) -> str:
    if spec.expert_id is None:
        return spec.hf_name
    return f"{spec.hf_name} (routed expert {spec.expert_id}, needed by rank {rank})"


def build_model(cfg: ModelConfig, device, dtype: torch.dtype, fp8: bool, **kwargs) -> Transformer:
    """A Transformer with uninitialized weights on `device`: run-dtype tensors, FP8 weights and fp32 scales/bias."""
    with torch.device("meta"):
        model = Transformer(cfg, fp8=fp8, **kwargs)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            keep = p.dtype in (FP8_DTYPE,) or name.endswith("scale")
            setattr(module, name, torch.nn.Parameter(p.to(p.dtype if keep else dtype), requires_grad=False))
    model.to_empty(device=device)
    model.init_buffers()
    return model


def load_model(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    fp8: bool = False,
    attn_impl: str = "absorb",
    dispatcher: Dispatcher | None = None,
    load_mtp: bool = False,
    max_seq_len: int | None = None,
    rank: int = 0,
    progress: bool = True,
) -> Transformer:
    """Load the checkpoint at `path` (dsr1.load_model).

    device/dtype default to CUDA + bf16 when available, else CPU + float32. fp8=True keeps FP8 weights
    in memory and dequantizes per matmul; otherwise they are dequantized once, here. The dispatcher's
    `local_expert_ids` say which routed experts this process holds (all of them by default).
    """
    default_device, default_dtype = default_device_dtype()
    device = torch.device(device or default_device)
    dtype = dtype or (default_dtype if device.type == default_device.split(":")[0] else torch.float32)
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    if fp8 and not ckpt.is_fp8:
        raise ValueError(f"fp8=True keeps FP8 weights in memory, but {ckpt.path} is not an FP8 checkpoint (no quantization_config)")
    model = build_model(cfg, device, dtype, fp8, dispatcher=dispatcher, attn_impl=attn_impl, max_seq_len=max_seq_len, load_mtp=load_mtp)
    specs = checkpoint_tensors(cfg, ckpt.is_fp8, expert_ids=model.dispatcher.local_expert_ids, mtp=load_mtp)
    ckpt.check(specs, rank)

    scales = {s.hf_name: s for s in specs if s.is_scale}
    todo = [s for s in specs if fp8 or not s.is_scale]  # dequantizing: each scale is read with its weight
    bytes_read = 0
    bar = tqdm(total=sum(_nbytes(s) for s in specs), unit="B", unit_scale=True, desc=f"loading {ckpt.path.name}", disable=not progress)
    for spec in todo:
        tensor = ckpt.read(spec)
        bar.update(_nbytes(spec))
        if spec.dtype == FP8_DTYPE and not fp8:
            scale = scales[spec.hf_name.removesuffix(".weight") + ".weight_scale_inv"]
            bar.update(_nbytes(scale))
            bytes_read += _nbytes(scale)
            tensor = dequantize(tensor.to(device), ckpt.read(scale).to(device), dtype)
        _target(model, spec).copy_(tensor)
        bytes_read += _nbytes(spec)
    bar.close()
    model.load_stats = LoadStats(
        tensors_read=len(specs),
        bytes_read=bytes_read,
        tensors_total=len(ckpt.weight_map),
        bytes_total=ckpt.total_bytes(),
        shards_opened=len(ckpt._handles),
        shards_total=len(ckpt.shards),
    )
    return model.eval()


def _nbytes(spec: TensorSpec) -> int:
    n = spec.dtype.itemsize
    for d in spec.shape:
        n *= d
    return n


def _target(model: Transformer, spec: TensorSpec) -> torch.Tensor:
    try:
        t = model.get_parameter(spec.param)
    except AttributeError:
        t = model.get_buffer(spec.param)
    return t.data if spec.slot is None else t.data[spec.slot]


def default_device_dtype() -> tuple[str, torch.dtype]:
    """CUDA (this process's LOCAL_RANK) with bf16 when available, else CPU with float32."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}", torch.bfloat16
    return "cpu", torch.float32
