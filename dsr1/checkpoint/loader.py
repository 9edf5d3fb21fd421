"""Load a Hugging Face DeepSeek-R1 checkpoint directory into a `Transformer`.

Shard names come from `model.safetensors.index.json` (or the directory holds one `model.safetensors`);
other files are ignored. Before any memory is allocated for weights, the index is checked against the
config (every tensor present, nothing unknown but the MTP layers) and each tensor this process reads
is checked for shape and dtype in its shard's header. The bytes are then read straight into the
parameters (dsr1/checkpoint/reader.py: parallel reads, through pinned buffers to a GPU), never into a
state dict; tensors that change dtype on the way (FP8 weights dequantized at load, bf16 into an fp32
model) are read into temporaries a batch at a time and converted. An expert-parallel rank reads the
replicated tensors and its own routed experts only; shards holding none of them are never opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dsr1.checkpoint.fp8 import FP8_DTYPE, dequantize
from dsr1.checkpoint.hf_names import TensorSpec, checkpoint_tensors, routed_expert_id
from dsr1.checkpoint.reader import Read, Reader, TensorEntry, read_header
from dsr1.config import ModelConfig
from dsr1.model.fp8_gemm import select_fp8_backend, use_fp8_gemm
from dsr1.model.transformer import Transformer
from dsr1.parallel.dispatch import Dispatcher

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONVERT_BATCH = 1 << 30  # bytes read into temporaries before they are converted into the parameters


@dataclass
class LoadStats:
    """What one process read, against the whole checkpoint and against its ideal share of it.

    ideal_bytes = replicated bytes + routed-expert bytes * n_local / n_routed (routed / ep_size).
    """

    rank: int
    tensors_read: int
    bytes_read: int
    tensors_total: int
    bytes_total: int
    shards_opened: int
    shards_total: int
    ideal_bytes: int

    @property
    def ideal_ratio(self) -> float:
        return self.bytes_read / max(self.ideal_bytes, 1)

    def summary(self) -> str:
        return (
            f"rank {self.rank}: read {self.tensors_read}/{self.tensors_total} tensors, "
            f"{_size(self.bytes_read)} of {_size(self.bytes_total)} ({self.bytes_read / max(self.bytes_total, 1):.1%}) "
            f"from {self.shards_opened}/{self.shards_total} shards; {self.ideal_ratio:.3f}x the ideal "
            f"{_size(self.ideal_bytes)} (replicated + this rank's share of the routed experts)"
        )


class Checkpoint:
    """A checkpoint directory: its config, which shard holds each tensor, and the headers of the shards read so far."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        self.config = ModelConfig.from_file(self.path / "config.json")
        self.weight_map: dict[str, str] = {}  # tensor name -> shard file name
        self._headers: dict[str, dict[str, TensorEntry]] = {}  # shard file name -> its tensors
        index = self.path / INDEX_FILE
        if index.is_file():
            self.weight_map = _read_index(index)
        elif (self.path / SINGLE_FILE).is_file():
            self.weight_map = {name: SINGLE_FILE for name in self.header(SINGLE_FILE)}
        else:
            raise FileNotFoundError(f"{self.path} holds neither {INDEX_FILE} nor {SINGLE_FILE}")
        self.shards = sorted(set(self.weight_map.values()))
        # Every rank fails alike on a missing shard, even one it would not read.
        absent = [s for s in self.shards if not (self.path / s).is_file()]
        if absent:
            raise FileNotFoundError(f"{len(absent)} shard files listed in {index} are missing: " + "; ".join(map(self._describe_shard, absent[:5])))
        self.tensors_read = self.bytes_read = 0

    @property
    def is_fp8(self) -> bool:
        return self.config.quant is not None

    @property
    def opened(self) -> set[str]:
        """The shards whose headers were read so far."""
        return set(self._headers)

    def header(self, filename: str) -> dict[str, TensorEntry]:
        """The tensors of shard `filename` (its header, read and checked once)."""
        if filename not in self._headers:
            try:
                self._headers[filename] = read_header(self.path / filename)
            except (OSError, ValueError) as e:
                raise ValueError(f"{self._describe_shard(filename)} is truncated or corrupt: {e}") from e
        return self._headers[filename]

    def _describe_shard(self, filename: str) -> str:
        names = [n for n, f in self.weight_map.items() if f == filename]
        return f"shard {self.path / filename}" + (f" (holding {len(names)} tensors, e.g. {names[0]})" if names else "")

    def total_bytes(self) -> int:
        return sum((self.path / s).stat().st_size for s in self.shards)

    def check(self, specs: list[TensorSpec], load_mtp: bool, rank: int = 0) -> None:
        """Raise unless the checkpoint holds what the config implies and `specs` (this rank's tensors)
        have the right shape and dtype. Only the shards holding `specs` are opened (headers only)."""
        self.check_names(load_mtp, {s.expert_id for s in specs if s.expert_id is not None}, rank)
        for spec in specs:
            entry = self.entry(spec, rank)
            if entry.shape != spec.shape or entry.dtype != spec.dtype:
                raise ValueError(
                    f"rank {rank}: tensor {spec.hf_name} in shard {self.weight_map[spec.hf_name]}: expected shape {list(spec.shape)} "
                    f"dtype {spec.dtype}, found shape {list(entry.shape)} dtype {entry.dtype}"
                )

    def entry(self, spec: TensorSpec, rank: int = 0) -> TensorEntry:
        """Where `spec`'s tensor lies in its shard."""
        filename = self.weight_map[spec.hf_name]
        entry = self.header(filename).get(spec.hf_name)
        if entry is None:
            raise ValueError(f"rank {rank}: tensor {spec.hf_name} is listed in {INDEX_FILE} for shard {filename}, which does not hold it")
        return entry

    def check_names(self, load_mtp: bool, local_expert_ids: set[int], rank: int) -> None:
        """The index (names only) holds every tensor of every expert the config implies, and no tensor
        it does not know: all ranks see the same names, so all of them fail together."""
        cfg = self.config
        expected = checkpoint_tensors(cfg, self.is_fp8, mtp=load_mtp)
        known = {s.hf_name for s in checkpoint_tensors(cfg, self.is_fp8, mtp=True)}  # MTP tensors are known, read only with load_mtp
        missing = [s for s in expected if s.hf_name not in self.weight_map]
        unexpected = [n for n in self.weight_map if n not in known]
        if not missing and not unexpected:
            return
        lines = [f"rank {rank}: checkpoint {self.path} does not match its config.json:"]
        if missing:
            lines.append(f"  {len(missing)} missing tensors, e.g. " + ", ".join(_describe(s, local_expert_ids, rank) for s in missing[:5]))
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected tensors, e.g. " + ", ".join(f"{n} (in {self.weight_map[n]})" for n in unexpected[:5]))
        absent = sorted({s.expert_id for s in missing if s.expert_id is not None})
        extra = sorted({e for n in unexpected if (e := routed_expert_id(n)) is not None and e >= cfg.n_routed_experts})
        if absent:
            lines.append(f"  routed experts {absent} are missing; config.json says n_routed_experts={cfg.n_routed_experts}")
        if extra:
            lines.append(f"  the checkpoint has routed experts {extra}, beyond config.json's n_routed_experts={cfg.n_routed_experts}")
        if not self.is_fp8 and any(n.endswith(".weight_scale_inv") for n in unexpected):
            lines.append("  the checkpoint holds FP8 block scales (weight_scale_inv), but config.json has no quantization_config")
        raise ValueError("\n".join(lines))

    def read_into(self, spec: TensorSpec, dest: torch.Tensor) -> Read:
        """The read that fills `dest` (a contiguous tensor of the spec's dtype and shape) with `spec`'s bytes."""
        entry = self.entry(spec)
        self.tensors_read += 1
        self.bytes_read += entry.end - entry.start
        return Read(self.path / self.weight_map[spec.hf_name], entry.start, dest.view(-1).view(torch.uint8), spec.hf_name)


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from e
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
    return weight_map


def _describe(spec: TensorSpec, local_expert_ids: set[int], rank: int) -> str:
    if spec.expert_id is None:
        return spec.hf_name
    holder = f"rank {rank} holds it" if spec.expert_id in local_expert_ids else "held by another rank"
    return f"{spec.hf_name} (routed expert {spec.expert_id}, {holder})"


def local_experts(cfg: ModelConfig, dispatcher: Dispatcher | None, rank: int) -> list[int]:
    """The global routed expert in each local slot: the dispatcher's, checked against the config."""
    if dispatcher is None:
        return list(range(cfg.n_routed_experts))
    ids = [int(e) for e in dispatcher.local_expert_ids]
    if len(ids) != dispatcher.n_local_experts or len(set(ids)) != len(ids) or not all(0 <= e < cfg.n_routed_experts for e in ids):
        raise ValueError(
            f"rank {rank}: dispatcher.local_expert_ids={ids} must be n_local_experts={dispatcher.n_local_experts} distinct "
            f"expert ids in [0, {cfg.n_routed_experts}) (config.json n_routed_experts)"
        )
    return ids


def build_model(cfg: ModelConfig, device, dtype: torch.dtype, fp8: bool, **kwargs) -> Transformer:
    """A Transformer with uninitialized weights on `device`: run-dtype tensors, FP8 weights, fp32 scales/bias and
    the parameters a module lists in `fp32_params`."""
    with torch.device("meta"):
        model = Transformer(cfg, fp8=fp8, **kwargs)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            keep = p.dtype == FP8_DTYPE or name.endswith("scale") or name in getattr(module, "fp32_params", ())
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
    gemm: str = "auto",
) -> Transformer:
    """Load the checkpoint at `path` (dsr1.load_model); the result's `.load_stats` says what was read.

    device/dtype default to CUDA + bf16 when available, else CPU + float32. fp8=True keeps FP8 weights
    in memory and multiplies them with the `gemm` backend (dsr1/model/fp8_gemm.py: 'auto' takes FP8
    matmuls where the device has them, 'dequant' dequantizes per matmul); otherwise they are
    dequantized once, here. The dispatcher's `local_expert_ids` say which routed experts this process
    holds, in slot order (all by default); `rank` only labels messages.
    """
    default_device, default_dtype = default_device_dtype()
    device = torch.device(device or default_device)
    dtype = dtype or (default_dtype if device.type == default_device.split(":")[0] else torch.float32)
    ckpt = Checkpoint(path)
    cfg = ckpt.config
    if fp8 and not ckpt.is_fp8:
        raise ValueError(f"fp8=True keeps FP8 weights in memory, but {ckpt.path} is not an FP8 checkpoint (no quantization_config)")
    expert_ids = local_experts(cfg, dispatcher, rank)
    specs = checkpoint_tensors(cfg, ckpt.is_fp8, expert_ids=expert_ids, mtp=load_mtp)
    ckpt.check(specs, load_mtp, rank)  # nothing is allocated or copied before this passes
    model = build_model(cfg, device, dtype, fp8, dispatcher=dispatcher, attn_impl=attn_impl, max_seq_len=max_seq_len, load_mtp=load_mtp)
    copy_weights(ckpt, specs, model, fp8, progress)
    if fp8:
        use_fp8_gemm(model, select_fp8_backend(gemm, device))

    every = checkpoint_tensors(cfg, ckpt.is_fp8, mtp=load_mtp)
    routed = sum(s.nbytes for s in every if s.expert_id is not None)
    model.load_stats = LoadStats(
        rank=rank,
        tensors_read=ckpt.tensors_read,
        bytes_read=ckpt.bytes_read,
        tensors_total=len(ckpt.weight_map),
        bytes_total=ckpt.total_bytes(),
        shards_opened=len(ckpt.opened),
        shards_total=len(ckpt.shards),
        ideal_bytes=sum(s.nbytes for s in every) - routed + routed * len(expert_ids) // cfg.n_routed_experts,
    )
    return model.eval()


def copy_weights(ckpt: Checkpoint, specs: list[TensorSpec], model: Transformer, fp8: bool, progress: bool) -> None:
    """Read every spec into `model`: straight into its parameter where the dtype is kept, else into a
    temporary that is converted (FP8 weight + scale dequantized, or cast), a batch of them at a time."""
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    if fp8:
        groups = [[s] for s in specs]
    else:  # dequantizing here: each FP8 weight is read with its scale, which may sit in another shard
        by_name = {s.hf_name: s for s in specs}
        groups = [[s, by_name[s.scale_name]] if s.dtype == FP8_DTYPE else [s] for s in specs if not s.is_scale]
    targets = [_target(model, g[0]) for g in groups]
    kept = [len(g) == 1 and t.dtype == g[0].dtype for g, t in zip(groups, targets)]
    direct = [(g[0], t) for g, t, k in zip(groups, targets, kept) if k]
    converted = [(g, t) for g, t, k in zip(groups, targets, kept) if not k]
    bar = tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc=f"loading {ckpt.path.name}", disable=not progress)
    with Reader(device) as reader:
        reader.read([ckpt.read_into(spec, target) for spec, target in direct], bar.update)
        for batch in _batches(converted, CONVERT_BATCH):
            temps = [[torch.empty(s.shape, dtype=s.dtype, device=device) for s in g] for g, _ in batch]
            reader.read([ckpt.read_into(s, t) for (g, _), ts in zip(batch, temps) for s, t in zip(g, ts)], bar.update)
            for (g, target), ts in zip(batch, temps):
                target.copy_(ts[0] if len(g) == 1 else dequantize(ts[0], ts[1], dtype))
    bar.close()


def _batches(groups: list[tuple[list[TensorSpec], torch.Tensor]], limit: int) -> list[list[tuple[list[TensorSpec], torch.Tensor]]]:
    """Consecutive (group, target) pairs, at most `limit` bytes of groups per batch (a larger group alone)."""
    batches, size = [[]], 0
    for item in groups:
        n = sum(s.nbytes for s in item[0])
        if batches[-1] and size + n > limit:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += n
    return batches


def _target(model: Transformer, spec: TensorSpec) -> torch.Tensor:
    try:
        t = model.get_parameter(spec.param)
    except AttributeError:
        t = model.get_buffer(spec.param)
    return t.data if spec.slot is None else t.data[spec.slot]


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def default_device_dtype() -> tuple[str, torch.dtype]:
    """CUDA (this process's LOCAL_RANK) with bf16 when available, else CPU with float32."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}", torch.bfloat16
    return "cpu", torch.float32
