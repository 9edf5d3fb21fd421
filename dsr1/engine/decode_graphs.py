"""Decode steps replayed from CUDA graphs, one graph per batch bucket.

Eager decode launches on the order of a thousand kernels per step from Python, and at batch 1 the host
time per launch exceeds the GPU time. A CUDA graph replays the whole step with one launch. A graph fixes
shapes and addresses, so:
- a batch of b rows runs in the graph of the smallest bucket B >= b; the B - b padding rows feed token 0
  at position 0 of their own (unused) cache rows;
- every graph attends over all T rows of one shared KV cache [max bucket, T] (rows past a query's
  position are masked), instead of sizing the key range from the positions, which needs a host sync;
- the step must be free of host syncs: the `masked` expert kernel (GroupedExperts) and a capturable
  dispatcher (LocalDispatcher or DeepEP LL; the torch dispatcher reads split sizes on the host).

Under expert parallelism every rank replays a graph in every step (a rank without prompts replays the
smallest bucket on a padding row), each MoE layer makes exactly one dispatch (the buckets stay within the
dispatcher's max_tokens, and capture runs under `single_dispatch`), and the ranks capture the same
buckets in the same order, all of them up front, since capturing runs steps that dispatch.

With `compile`, each decoder block runs through torch.compile (Inductor) inside the graph: the dozens of
small elementwise, norm, rope and softmax kernels per block fuse into a few (the FP8 matmuls stay the
w8a16 kernel, an opaque operator to it). One compiled block serves every layer of its kind (dense or MoE)
at a bucket's shape, so compile time does not grow with depth. The fused kernels round where the eager ops
round, so the step computes what the eager step computes. Off by default: it costs compile time per bucket.

One process captures a bucket's graph on first use in `prepare(b)`, which must come before the prefill
that fills the cache: capturing runs the step, which writes cache position 0 of the bucket's rows.

b batch, B bucket, T cache length, v vocabulary
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from dsr1.model.attention import Causal
from dsr1.model.mlp import GroupedExperts
from dsr1.model.transformer import Transformer
from dsr1.model.dispatch import single_dispatch
from dsr1.parallel.dist import all_reduce_max

BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # then max_batch itself
RECOMPILE_LIMIT = 64  # compiled block variants kept per process (dynamo's default, 8, is four buckets' worth)
AUTO_CACHE_SHARE = 0.25  # --cuda-graphs auto declines when the shared cache would take more of the free GPU memory


class DecodeGraphs:
    def __init__(
        self, model: Transformer, max_len: int, max_batch: int = BUCKETS[-1], group: ProcessGroup | None = None, compile: bool = False
    ):
        """Graphs for batches of up to max_batch rows (with a group: the largest over its ranks) and
        sequences of up to max_len positions; with a group, every bucket is captured here, in lockstep.
        compile: decoder blocks through torch.compile (see the module docstring)."""
        check_capturable(model)
        if group is not None:
            max_batch = all_reduce_max(max_batch, group)
            if max_batch > model.dispatcher.max_tokens:
                raise ValueError(
                    f"CUDA graphs under expert parallelism need batches within one dispatch: {max_batch} rows per rank "
                    f"> --max-dispatch-tokens {model.dispatcher.max_tokens}"
                )
        self.model, self.max_len = model, max_len
        self.buckets = tuple(size for size in BUCKETS if size < max_batch) + (max_batch,)
        self.cache = model.new_cache(self.buckets[-1], max_len)  # shared by every bucket: rows [0, B)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, _Graph] = {}  # bucket B -> its graph
        self.block = compiled_block() if compile else run_block  # how decode_step runs each decoder block
        if group is not None:
            for size in self.buckets:
                self.graphs[size] = self._capture(size)

    def bucket(self, b: int) -> int | None:
        """The bucket a batch of b rows (0: an idle EP rank) runs in, or None if b exceeds the largest."""
        return next((size for size in self.buckets if size >= b), None)

    def prepare(self, b: int) -> list:
        """Capture the graph for b rows' bucket if needed; returns the cache the prefill must fill (rows [0, b))."""
        size = self.bucket(b)
        if size is None:
            raise ValueError(f"batch {b} exceeds the largest CUDA-graph bucket {self.buckets[-1]}")
        if size not in self.graphs:
            self.graphs[size] = self._capture(size)
        return self.cache

    def step(self, tokens: Tensor, start_pos: Tensor) -> Tensor:
        """One decode step: tokens [b, 1] at positions start_pos [b] -> logits [b, v] fp32."""
        b = tokens.shape[0]
        g = self.graphs[self.bucket(b)]
        g.tokens.zero_()
        g.positions.zero_()
        g.tokens[:b].copy_(tokens)
        g.positions[:b].copy_(start_pos)
        g.graph.replay()
        return g.logits[:b].clone()

    def _capture(self, size: int) -> _Graph:
        device = self.model.embed.weight.device
        g = _Graph(
            graph=torch.cuda.CUDAGraph(),
            tokens=torch.zeros(size, 1, dtype=torch.long, device=device),
            positions=torch.zeros(size, dtype=torch.long, device=device),
            logits_at=torch.zeros(size, dtype=torch.long, device=device),  # the one new position
        )

        def run(block: Callable = self.block) -> Tensor:
            return decode_step(self.model, g.tokens, g.positions, self.cache, g.logits_at, self.max_len, block)  # [B, v]

        g.logits = capture(self.model, g.graph, self.pool, run, self.block)
        return g


def capture(model: Transformer, graph: torch.cuda.CUDAGraph, pool, run: Callable, block: Callable) -> Tensor:
    """Capture run(block), one decode step of `model` -> its output, into `graph` (memory from `pool`), after
    warm-up runs off the capture (Triton compiles, cuBLAS picks its kernels): uncompiled first, so that lazily made
    state (kept dense weights, split-K counters) exists before tracing, then twice with `block`. Under
    single_dispatch, as every replay makes one dispatch per MoE layer. Each bucket and cache length compiles two
    kinds of block (dense, MoE): past dynamo's recompile limit it would quietly run blocks uncompiled."""
    device = model.embed.weight.device
    with single_dispatch(model.dispatcher), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            run(run_block)
            run(block)
            run(block)
        torch.cuda.current_stream(device).wait_stream(stream)
        with torch.cuda.graph(graph, pool=pool):
            return run(block)


def run_block(layer, h: Tensor, positions: Tensor, freqs_cis: Tensor, mask: Causal, cache) -> Tensor:
    """One decoder block, as a function of the block: compiled once, it serves every layer of the same kind."""
    return layer(h, positions, freqs_cis, mask, cache)


def decode_step(model: Transformer, tokens: Tensor, start_pos: Tensor, cache: list, logits_at: Tensor, n_keys: int, block=run_block) -> Tensor:
    """Transformer.forward(tokens, start_pos, cache, logits_at) without its host sync: the queries attend over
    the fixed cache rows [0, n_keys) (masked past each position), and nothing checks max_seq_len.
    tokens [b, s], start_pos [b], logits_at [b] -> logits [b, v] fp32. block(layer, h, positions, freqs_cis,
    mask, cache) runs each decoder block: `run_block` (the default) or `compiled_block()`."""
    h = hidden_states(model, tokens, model.positions(tokens, start_pos), cache, n_keys, block)  # [b, s, m]
    return model.logits(h, logits_at)


def hidden_states(model: Transformer, tokens: Tensor, positions: Tensor, cache: list, n_keys: int, block=run_block) -> Tensor:
    """The decoder blocks' output h [b, s, m] (before the final norm) for tokens [b, s] at any `positions` [b, s],
    attending over cache rows [0, n_keys) masked past each position; no host sync. The serving engine
    (dsr1/engine/runner.py) calls it with positions of its own choosing for the padding of a batch."""
    mask = Causal.cached(positions, n_keys)  # keys at 0 .. T - 1: each layer masks those past each position
    freqs_cis = model.freqs_cis[positions]  # [b, s, r/2]
    h = model.embed(tokens)  # [b, s, m]
    for layer, layer_cache in zip(model.layers, cache):  # the MTP layers' caches come last, unused
        h = block(layer, h, positions, freqs_cis, mask, layer_cache)
    return h


def compiled_block():
    """torch.compile'd `run_block`, for decode_step: static shapes, one compile per kind of block and shape.
    Fused kernels round to bf16 wherever the eager ops do (emulate_precision_casts): without it, on an
    H200, the tiny test model's logits moved 7x further from the fp32 model's than eager's. On Hopper,
    Inductor's kernels use programmatic dependent launch as the W8A16 kernel does (each waits for the
    previous kernel before touching what it wrote): a batch-1 step on an H200 2% faster, bit-identical."""
    import torch._inductor.config as inductor_config

    options = {"emulate_precision_casts": True}
    if hasattr(inductor_config.triton, "enable_pdl"):  # torch >= 2.10; Inductor checks the device itself
        options["triton.enable_pdl"] = True
    return torch.compile(run_block, dynamic=False, options=options)


@dataclass
class _Graph:
    """One bucket's graph and every tensor it reads or writes outside its pool: they must outlive it (a
    freed input's memory would be reused, and the replay would read whatever lands there)."""

    graph: torch.cuda.CUDAGraph
    tokens: Tensor  # [B, 1]
    positions: Tensor  # [B]
    logits_at: Tensor  # [B] zeros
    logits: Tensor | None = None  # [B, v] fp32, written by each replay


def check_capturable(model: Transformer) -> None:
    """Raise, naming what, if a decode step of `model` would sync with the host (and so cannot be captured)."""
    if model.embed.weight.device.type != "cuda":
        raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {model.embed.weight.device}")
    if not model.dispatcher.capturable:
        raise ValueError(
            f"CUDA graphs need a dispatcher without host syncs (one process, or --all2all deepep_ll); "
            f"{type(model.dispatcher).__name__} reads split sizes on the host: run it with --cuda-graphs off"
        )
    probe = model.embed.weight.new_empty(0)
    for name, module in model.named_modules():
        if not isinstance(module, GroupedExperts):
            continue
        kernel = module.kernel(probe)  # None: the per-expert loop, which reads the counts on the host
        if kernel is None or not kernel.capturable:
            used = "the per-expert loop" if kernel is None else f"the {kernel.name} kernel"
            raise ValueError(
                f"CUDA graphs need the masked expert kernel, but {name} uses {used} "
                f"(needs Triton; FP8 experts also need --fp8-gemm w8a16 or auto): run with --cuda-graphs off"
            )


GRAPH_MODES = ("auto", "on", "off")


def make_graphs(
    model: Transformer, mode: str, max_len: int, max_batch: int, group: ProcessGroup | None = None, compile: bool = False
) -> DecodeGraphs | None:
    """--cuda-graphs: `off` decodes eagerly; `on` captures graphs or raises saying why it can't;
    `auto` captures them where the model allows (CUDA, the masked expert kernel, a capturable dispatcher)
    and the shared cache fits. The graphs serve batches of up to max_batch rows and max_len positions.
    With an EP group the ranks decide together (all graphs or none) and capture together.
    compile (--compile-decode): blocks through torch.compile inside the graphs."""
    if mode not in GRAPH_MODES:
        raise ValueError(f"--cuda-graphs {mode!r} is not one of {GRAPH_MODES}")
    if mode == "off":
        return None
    why = None
    try:
        check_capturable(model)
        if mode == "auto" and cache_bytes(model, max_batch, max_len) > AUTO_CACHE_SHARE * torch.cuda.mem_get_info(model.embed.weight.device)[0]:
            why = "the shared cache would take over a quarter of free GPU memory"
    except ValueError as e:
        why = str(e)
    if group is not None and all_reduce_max(int(why is not None), group) and why is None:
        why = "another expert-parallel rank cannot capture them"
    if why is not None:
        if mode == "on":
            raise ValueError(why)
        return None
    return DecodeGraphs(model, max_len, max_batch, group, compile)


def cache_bytes(model: Transformer, batch: int, max_len: int) -> int:
    """Bytes of the KV cache model.new_cache(batch, max_len) allocates."""
    caches = [layer.attn.new_cache(1, 1, model.embed.weight.dtype, "meta") for layer in [*model.layers, *model.mtp]]
    per_position = sum(t.nbytes for c in caches for t in c.tensors())
    return per_position * batch * max_len
