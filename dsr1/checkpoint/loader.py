"""Load a Hugging Face DeepSeek-R1 checkpoint directory into a `Transformer`, in three steps that
dsr1/engine/load.py runs: `Checkpoint(path)` reads config.json and the index; `ckpt.plan(expert_ids)`
checks the checkpoint and lists what this process reads (the routed experts it holds: the placement's);
`read_weights(ckpt, plan, build_model(...))` fills the model.

Shard names come from `model.safetensors.index.json` (or the directory holds one `model.safetensors`);
other files are ignored. The directory is untrusted: every file read (config, index, shards) must
resolve, symlinks followed, to a regular file inside it. Before any memory is allocated for weights,
the index is checked against the config (every tensor present, nothing unknown but the MTP layers)
and every tensor it lists, read by this process or not, is checked for shape and dtype in its
shard's header. The bytes are then read straight into the parameters (dsr1/checkpoint/reader.py:
parallel reads, through pinned buffers to a GPU), never into a state dict; tensors that change dtype
on the way (FP8 weights dequantized at load, bf16 into an fp32 model) are read into temporaries a
batch at a time and converted. An expert-parallel rank reads the bytes of the replicated tensors and
its own routed experts only; of shards holding none of them it reads the header alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from dsr1.fp8 import FP8_DTYPE, dequantize
from dsr1.checkpoint.hf_names import TensorSpec, checkpoint_tensors, routed_expert_id
from dsr1.checkpoint.reader import Read, Reader, TensorEntry, json_object, read_header
from dsr1.config import ModelConfig
from dsr1.model.transformer import Transformer

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
    shards_opened: int  # shards whose tensor bytes this process read (it reads every shard's header)
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


@dataclass
class LoadPlan:
    """What one process reads of a checked checkpoint (Checkpoint.plan)."""

    specs: list[TensorSpec]  # the replicated tensors and this rank's routed experts, each in its local slot
    ideal_bytes: int  # replicated bytes + routed-expert bytes * n_local / n_routed
    rank: int  # labels messages and LoadStats


class Checkpoint:
    """A checkpoint directory: its config, which shard holds each tensor, where each shard file lies, and the
    headers of the shards read so far."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        self.root = self.path.resolve()  # every file read lies inside it (or, for a hub snapshot, in its repo's blobs)
        self.roots = [self.root, *hub_blobs(self.root)]
        self.config = ModelConfig.from_file(self._inside("config.json", str(self.path / "config.json")))
        self.weight_map: dict[str, str] = {}  # tensor name -> shard file name
        self.files: dict[str, Path] = {}  # shard file name -> the file, resolved
        self._headers: dict[str, dict[str, TensorEntry]] = {}  # shard file name -> its tensors
        index = self._inside(INDEX_FILE, str(self.path / INDEX_FILE))
        if index.is_file():
            self.weight_map = _read_index(index)
            for name, shard in self.weight_map.items():  # before any shard is opened
                if shard not in self.files:
                    self.files[shard] = self._inside(shard, f"{index}: tensor {name!r} is in shard {shard!r}, which")
        elif (single := self._inside(SINGLE_FILE, str(self.path / SINGLE_FILE))).is_file():
            self.files[SINGLE_FILE] = single
            self.weight_map = {name: SINGLE_FILE for name in self.header(SINGLE_FILE)}
        else:
            raise FileNotFoundError(f"{self.path} holds neither {INDEX_FILE} nor {SINGLE_FILE}")
        self.shards = sorted(self.files)
        # Every rank fails alike on a missing shard, even one it would not read.
        absent = [s for s in self.shards if not self.files[s].exists()]
        if absent:
            raise FileNotFoundError(f"{len(absent)} shard files listed in {index} are missing: " + "; ".join(map(self._describe_shard, absent[:5])))
        self.tensors_read = self.bytes_read = 0
        self.shards_read: set[str] = set()  # the shards whose tensor bytes were read

    def _inside(self, name: str, what: str) -> Path:
        """The directory's file `name`, symlinks resolved. ValueError (`what`, then what is wrong) unless it lies
        inside the directory and is a regular file or absent (the caller reports an absent file). Nothing is opened."""
        try:
            path = (self.root / name).resolve()
            if not any(path.is_relative_to(root) for root in self.roots):
                problem = f"resolves to {path}"
            elif path.exists() and not path.is_file():
                problem = f"resolves to {path}, not a regular file"
            else:
                return path
        except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a name too long or holding a NUL byte
            problem = f"cannot be resolved ({e})"
        raise ValueError(f"{what} {problem}; expected a file inside {' or '.join(map(str, self.roots))}")

    @property
    def is_fp8(self) -> bool:
        return self.config.quant is not None

    def header(self, filename: str) -> dict[str, TensorEntry]:
        """The tensors of shard `filename` (its header, read and checked once)."""
        if filename not in self._headers:
            try:
                self._headers[filename] = read_header(self.files[filename])
            except (OSError, ValueError) as e:
                raise ValueError(f"{self._describe_shard(filename)} is truncated or corrupt: {e}") from e
        return self._headers[filename]

    def _describe_shard(self, filename: str) -> str:
        names = [n for n, f in self.weight_map.items() if f == filename]
        return f"shard {self.path / filename}" + (f" (holding {len(names)} tensors, e.g. {names[0]!r})" if names else "")

    def total_bytes(self) -> int:
        return sum(self.files[s].stat().st_size for s in self.shards)

    def plan(self, expert_ids: list[int], load_mtp: bool = False, rank: int = 0) -> LoadPlan:
        """The tensors a process holding routed experts `expert_ids` (global ids, in local slot order: the
        placement's) reads, MTP layers only with `load_mtp`. Raises first unless the checkpoint holds exactly
        what its config implies (check); reads no tensor bytes."""
        cfg = self.config
        if len(set(expert_ids)) != len(expert_ids) or not all(0 <= e < cfg.n_routed_experts for e in expert_ids):
            raise ValueError(
                f"rank {rank}: expert_ids={list(expert_ids)} must be distinct routed expert ids in [0, {cfg.n_routed_experts}) "
                f"(config.json n_routed_experts)"
            )
        every = checkpoint_tensors(cfg, self.is_fp8, mtp=True)  # the one tensor list of this load
        self.check(every, load_mtp, expert_ids, rank)
        loaded = [s for s in every if load_mtp or not is_mtp(s)]
        routed = sum(s.nbytes for s in loaded if s.expert_id is not None)
        ideal = sum(s.nbytes for s in loaded) - routed + routed * len(expert_ids) // cfg.n_routed_experts
        return LoadPlan(local_specs(loaded, expert_ids), ideal, rank)

    def check(self, every: list[TensorSpec], load_mtp: bool, expert_ids: list[int], rank: int = 0) -> None:
        """Raise unless the index lists exactly the tensors of `every` (all the config implies, MTP layers included,
        which may be absent unless `load_mtp`) and each has the shape and dtype `every` gives in its shard's header.
        Reads every shard's header, whichever tensors this rank (holding routed experts `expert_ids`) will read,
        and no tensor bytes."""
        self.check_names(every, load_mtp, set(expert_ids), rank)
        for spec in every:
            if spec.hf_name not in self.weight_map:  # an MTP tensor, not loaded (check_names let it pass)
                continue
            entry = self.entry(spec, rank)
            if entry.shape != spec.shape or entry.dtype != spec.dtype:
                raise ValueError(
                    f"rank {rank}: tensor {spec.hf_name} in shard {self.weight_map[spec.hf_name]!r}: expected shape {list(spec.shape)} "
                    f"dtype {spec.dtype}, found shape {list(entry.shape)} dtype {entry.dtype}"
                )

    def entry(self, spec: TensorSpec, rank: int = 0) -> TensorEntry:
        """Where `spec`'s tensor lies in its shard."""
        filename = self.weight_map[spec.hf_name]
        entry = self.header(filename).get(spec.hf_name)
        if entry is None:
            raise ValueError(f"rank {rank}: tensor {spec.hf_name} is listed in {INDEX_FILE} for shard {filename!r}, which does not hold it")
        return entry

    def check_names(self, every: list[TensorSpec], load_mtp: bool, local_expert_ids: set[int], rank: int) -> None:
        """The index (names only) holds every tensor of `every` (MTP ones only with `load_mtp`), and no other:
        all ranks see the same names, so all of them fail together."""
        cfg = self.config
        known = {s.hf_name for s in every}
        missing = [s for s in every if s.hf_name not in self.weight_map and (load_mtp or not is_mtp(s))]
        unexpected = [n for n in self.weight_map if n not in known]
        if not missing and not unexpected:
            return
        lines = [f"rank {rank}: checkpoint {self.path} does not match its config.json:"]
        if missing:
            lines.append(f"  {len(missing)} missing tensors, e.g. " + ", ".join(_describe(s, local_expert_ids, rank) for s in missing[:5]))
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected tensors, e.g. " + ", ".join(f"{n!r} (in {self.weight_map[n]!r})" for n in unexpected[:5]))
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
        filename = self.weight_map[spec.hf_name]
        self.tensors_read += 1
        self.bytes_read += entry.end - entry.start
        self.shards_read.add(filename)
        return Read(self.files[filename], entry.start, dest.view(-1).view(torch.uint8), spec.hf_name)


def is_mtp(spec: TensorSpec) -> bool:
    """Whether `spec` belongs to a multi-token-prediction layer (read only with load_mtp)."""
    return spec.param.startswith("mtp.")


def local_specs(specs: list[TensorSpec], expert_ids: list[int]) -> list[TensorSpec]:
    """The tensors of `specs` (listing every routed expert) a rank holding `expert_ids` reads, each routed
    expert's in its local slot (its place in `expert_ids`)."""
    slot = {e: i for i, e in enumerate(expert_ids)}
    return [s if s.expert_id is None else replace(s, slot=slot[s.expert_id]) for s in specs if s.expert_id is None or s.expert_id in slot]


def hub_blobs(root: Path) -> list[Path]:
    """[the repo's blobs/] if `root` is a Hugging Face hub cache snapshot (models--org--name/snapshots/rev,
    whose files are symlinks to ../../blobs/sha), else []."""
    repo = root.parent.parent
    if root.parent.name == "snapshots" and repo.name.startswith("models--") and (repo / "blobs").is_dir():
        return [repo / "blobs"]
    return []


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard file name); ValueError unless it is one, of non-empty names."""
    try:
        contents = json.loads(index.read_bytes().decode("utf-8"), object_pairs_hook=json_object)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{index}: not valid JSON ({e})") from e
    weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: expected a JSON object whose 'weight_map' maps tensor names to shard file names")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise ValueError(f"{index}: tensor {name!r} is in shard {shard!r:.200}, expected a shard file name")
    return weight_map


def _describe(spec: TensorSpec, local_expert_ids: set[int], rank: int) -> str:
    if spec.expert_id is None:
        return spec.hf_name
    holder = f"rank {rank} holds it" if spec.expert_id in local_expert_ids else "held by another rank"
    return f"{spec.hf_name} (routed expert {spec.expert_id}, {holder})"


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


def read_weights(ckpt: Checkpoint, plan: LoadPlan, model: Transformer, fp8: bool, progress: bool = True) -> LoadStats:
    """Read the tensors of `plan` into `model` (built for its experts: build_model); what was read.

    fp8=True reads FP8 weights and their scales into FP8 parameters; otherwise each FP8 weight is
    dequantized here, to the model's dtype."""
    copy_weights(ckpt, plan.specs, model, fp8, progress)
    return LoadStats(
        rank=plan.rank,
        tensors_read=ckpt.tensors_read,
        bytes_read=ckpt.bytes_read,
        tensors_total=len(ckpt.weight_map),
        bytes_total=ckpt.total_bytes(),
        shards_opened=len(ckpt.shards_read),
        shards_total=len(ckpt.shards),
        ideal_bytes=plan.ideal_bytes,
    )


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
