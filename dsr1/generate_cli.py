"""The command line behind scripts/generate.py: load a checkpoint (or the embedded tiny default),
encode prompts, generate, and print streamed text, plain completions or one JSON object per prompt.

Generation runs the static batch of dsr1.engine.generation (CUDA-graph decode on a GPU) unless --engine asks
for the serving engine (dsr1.engine.engine: continuous batching, prefix caching)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dsr1 import embedded
from dsr1.config import GenerationConfig, ModelConfig, ParallelConfig
from dsr1.engine.decode_graphs import GRAPH_MODES, make_graphs
from dsr1.engine.engine import Engine, EngineConfig, SamplingParams
from dsr1.engine.generation import generate
from dsr1.engine.load import default_device_dtype, gather_to_rank0, load_ep_model
from dsr1.model.attention import ATTN_IMPLS
from dsr1.kernels.attention import DECODE_ATTENTION, use_paged_decode
from dsr1.kernels.fp8_gemm import BACKENDS, select_fp8_backend
from dsr1.parallel.dist import init_distributed, is_rank0, log_rank0, rank_share
from dsr1.parallel.placement import STRATEGIES
from dsr1.tokenizer import decode, encode_messages, encode_prompt, load_tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Defaults that depend on what runs: R1's recommended sampling for a real checkpoint; a short greedy
# answer for the embedded random-weight model, whose output only shows that the pipeline runs.
CHECKPOINT_DEFAULTS = {"max_new_tokens": 256, "temperature": 0.6}
EMBEDDED_DEFAULTS = {"max_new_tokens": embedded.MAX_NEW_TOKENS, "temperature": 0.0}


class Parser(argparse.ArgumentParser):
    """Every error is the one line `generate.py: error: ...`, without the long usage block above it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def checked(convert, ok, expected: str):
    """An argparse type: convert(text), accepted if ok(value), else an error saying what was expected and found."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


POSITIVE = checked(int, lambda n: n >= 1, "an integer >= 1")
SEED = checked(int, lambda n: -(2**63) <= n < 2**64, "an integer in [-2**63, 2**64)")  # what torch.Generator takes
TEMPERATURE = checked(float, lambda t: math.isfinite(t) and t >= 0, "a finite number >= 0")
TOP_P = checked(float, lambda p: 0 < p <= 1, "a number in (0, 1]")


def device_arg(text: str) -> str:
    """--device: cpu, or cuda / cuda:N where this machine has that GPU."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is not None and (device.type == "cpu" or device.type == "cuda" and (device.index or 0) < gpus):
        return text
    cuda = f", cuda or cuda:0..cuda:{gpus - 1}" if gpus else f" (torch {torch.__version__} sees no CUDA device)"
    raise argparse.ArgumentTypeError(f"expected cpu{cuda}, got {text!r}")


def add_model_args(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "model" flags that say what to load and how (shared with scripts/serve.py); returns the group."""
    model = p.add_argument_group("model")
    model.add_argument("--ckpt-path", help="Hugging Face checkpoint directory (config.json, safetensors, tokenizer)")
    model.add_argument("--device", type=device_arg, help="default: cuda:$LOCAL_RANK when CUDA is available, else cpu")
    model.add_argument("--dtype", choices=DTYPES, help="activation/weight dtype; default bfloat16 on CUDA, float32 on CPU")
    model.add_argument("--attn-impl", choices=ATTN_IMPLS, default="absorb", help="absorb: cache the MLA latent (default); naive: per-head keys and values")
    model.add_argument("--fp8-weights", action="store_true", help="keep FP8 weights in memory (half of bf16's bytes); see --fp8-gemm")
    model.add_argument("--fp8-gemm", choices=BACKENDS, default="auto", help="with --fp8-weights, how FP8 weights are multiplied: auto picks "
                       "deepgemm (if importable), else w8a16 (Triton, CUDA), else torch's block-scaled scaled_mm (Hopper), else dequant")
    model.add_argument("--max-seq-len", type=POSITIVE, help="longest prompt + generation the model accepts; default max_position_embeddings")
    return model


def add_decode_args(group: argparse._ArgumentGroup) -> None:
    """--cuda-graphs, --compile-decode and --decode-attention (shared with scripts/serve.py, whose engine takes them)."""
    group.add_argument("--cuda-graphs", choices=GRAPH_MODES, default="auto", help="replay decode steps from CUDA graphs: auto (default) "
                       "where the run allows it (CUDA, Triton, one process or --all2all deepep_ll), on (error if it can't), off")
    group.add_argument("--compile-decode", action="store_true", help="with CUDA graphs, run the decoder blocks through torch.compile "
                       "(same function, about 25%% faster at batch 1 on H200; costs a compile per batch bucket at the start)")
    group.add_argument("--decode-attention", choices=tuple(DECODE_ATTENTION), default="gather", help="a decode step's attention over the "
                       "latent cache: gather (default): the cache's rows as one tensor, then MLA's products (W8A16 kernels on a GPU); "
                       "paged: a key-split kernel reading the cache in place (kernels/mla_decode.py; a GPU; not yet measured there)")


def add_ep_args(p: argparse.ArgumentParser) -> None:
    """The expert-parallel flags (shared with scripts/serve.py)."""
    ep = p.add_argument_group("expert parallelism (launch with torchrun --nproc-per-node EP)")
    ep.add_argument("--ep", type=POSITIVE, default=1, help="expert-parallel ranks = processes; attention runs data-parallel over them (default 1)")
    ep.add_argument("--expert-placement", choices=STRATEGIES, default=ParallelConfig.expert_placement, help="linear: rank r holds experts [r*L, (r+1)*L); round_robin: r, r+EP, r+2EP, ...")
    ep.add_argument("--all2all", choices=("torch", "deepep_ll"), default=ParallelConfig.all2all, help="token dispatch: torch.distributed collectives (gloo/NCCL) or DeepEP low-latency kernels")
    ep.add_argument("--deepep-fp8-dispatch", action="store_true", help="DeepEP sends FP8 activations with per-128 scales (default BF16)")
    ep.add_argument("--max-dispatch-tokens", type=POSITIVE, default=ParallelConfig.max_dispatch_tokens,
                    help=f"tokens per rank per dispatch; longer prefills are split (default {ParallelConfig.max_dispatch_tokens})")


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(args.ep, args.expert_placement, args.all2all, args.deepep_fp8_dispatch, args.max_dispatch_tokens)


def checkpoint_dir(ckpt_path: str | None, rank: int, world: int) -> Path:
    """--ckpt-path, or the embedded tiny checkpoint (built into the cache by rank 0 first) run on one intra-op thread."""
    if ckpt_path is not None:
        return Path(ckpt_path)
    # The tiny model's ops are too small to gain from intra-op threads, and on a busy machine
    # threads that wait on each other made its 32-token decode 20x slower (0.7 s -> 17 s).
    torch.set_num_threads(1)
    if rank != 0:
        dist.barrier()  # rank 0 builds the cached checkpoint first
    path = embedded.tiny_checkpoint()
    if rank == 0 and world > 1:
        dist.barrier()
    log_rank0(f"no --ckpt-path: running the embedded tiny random-weight checkpoint {path}", file=sys.stderr)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="generate.py",
        description="Generate text with DeepSeek-R1. Without --ckpt-path, runs a tiny random-weight checkpoint "
        "(built once into $XDG_CACHE_HOME/dsr1 or ~/.cache/dsr1) on a built-in prompt.",
    )
    model = add_model_args(p)
    model.add_argument("--prefill-chunk", type=POSITIVE, default=GenerationConfig.prefill_chunk, help="prompt tokens per prefill forward: "
                       f"peak activation memory follows this, not the prompt length (default {GenerationConfig.prefill_chunk})")
    add_decode_args(model)
    model.add_argument("--engine", action="store_true", help="generate with the serving engine (continuous batching, prefix caching, "
                       "--prefill-chunk prompt tokens per step, decode from CUDA graphs on one GPU) instead of one static batch that "
                       "waits for its longest answer; greedy output is the same; each prompt samples from its own generator "
                       "(seeded with --seed); needs --attn-impl absorb; a single prompt is printed when done, not streamed; not with --interactive")

    prompts = p.add_argument_group("prompts (default: the built-in prompt)")
    prompts.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    prompts.add_argument("--input-file", type=Path, help="one prompt per line (blank lines skipped), after any --prompt")
    prompts.add_argument("--interactive", action="store_true", help="multi-turn chat on stdin; /clear resets the history, /exit quits")
    prompts.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True, help="apply the R1 chat format (default); --no-chat feeds BOS + the raw prompt")

    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=POSITIVE, help=f"default {CHECKPOINT_DEFAULTS['max_new_tokens']} ({EMBEDDED_DEFAULTS['max_new_tokens']} for the embedded default)")
    sampling.add_argument("--temperature", type=TEMPERATURE, help=f"0 = greedy; default {CHECKPOINT_DEFAULTS['temperature']} as R1 recommends (0 for the embedded default)")
    sampling.add_argument("--top-p", type=TOP_P, default=0.95, help="nucleus sampling mass (default 0.95)")
    sampling.add_argument("--seed", type=SEED, help="seed for sampling; fixed seed + prompts = same output")

    output = p.add_argument_group("output")
    output.add_argument("--json", action="store_true", help='one JSON object per prompt per line: {"prompt", "prompt_token_ids", "token_ids", "text"}')

    add_ep_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.interactive and (args.prompt or args.input_file or args.json or not args.chat):
        parser.error("--interactive reads prompts from stdin in the chat format; drop --prompt, --input-file, --json and --no-chat")
    if args.engine and (args.interactive or args.attn_impl != "absorb"):
        parser.error("--engine runs --prompt/--input-file batches on the absorbed latent cache; "
                     "drop --interactive and --attn-impl naive, or drop --engine")
    try:
        run(args)
    except (ValueError, OSError, ImportError) as e:  # bad input: a file, a checkpoint, a flag the machine can't serve
        parser.error(str(e))


def run(args: argparse.Namespace) -> None:
    # Everything that can be checked is, before the weights load (minutes for R1).
    texts = [] if args.interactive else read_prompts(args)
    rank, world, _ = init_distributed()
    check_device(args)
    path = checkpoint_dir(args.ckpt_path, rank, world)
    defaults = EMBEDDED_DEFAULTS if args.ckpt_path is None else CHECKPOINT_DEFAULTS
    cfg = read_config(args, path)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    tokenizer = load_tokenizer(path)
    prompt_ids = [encode_prompt(tokenizer, text, chat=args.chat) for text in texts]
    max_seq_len = args.max_seq_len or cfg.max_position_embeddings
    longest = max_seq_len if args.interactive else max(map(len, prompt_ids)) + args.max_new_tokens
    if longest > max_seq_len:
        raise ValueError(
            f"the longest prompt has {longest - args.max_new_tokens} tokens; with --max-new-tokens {args.max_new_tokens} "
            f"it needs {longest} positions, beyond max_seq_len={max_seq_len} (--max-seq-len, at most max_position_embeddings="
            f"{cfg.max_position_embeddings}); shorten the prompt or lower --max-new-tokens"
        )
    parallel = parallel_config(args)
    model, group = load_ep_model(
        path, parallel, device=args.device, dtype=DTYPES.get(args.dtype), fp8=args.fp8_weights, gemm=args.fp8_gemm,
        attn_impl=args.attn_impl, max_seq_len=args.max_seq_len, progress=is_rank0(),
    )
    if group is not None:  # what each rank read of the checkpoint (its own experts only)
        for line in gather_to_rank0(model.load_stats.summary(), group) or []:
            log_rank0(line, file=sys.stderr)
    config = GenerationConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed, prefill_chunk=args.prefill_chunk)
    mine = rank_share(len(texts), rank, world)  # this rank decodes these prompts; all ranks step together
    use_paged_decode(model, DECODE_ATTENTION[args.decode_attention])  # before the graphs capture the decode step
    graphs = None if args.engine else make_graphs(model, args.cuda_graphs, longest, max(len(mine), 1), group, args.compile_decode)
    if args.interactive:
        chat_loop(model, tokenizer, config, group, graphs)
        return
    if len(texts) == 1 and not args.json and not args.engine:
        stream = TextStream(tokenizer)  # the prompt is rank 0's
        generate(model, [prompt_ids[i] for i in mine], config, on_token=stream, group=group, graphs=graphs)
        stream.finish()
        return
    if args.engine:
        engine_config = EngineConfig(max_num_batched_tokens=args.prefill_chunk, cuda_graphs=args.cuda_graphs, compile_decode=args.compile_decode,
                                     decode_attention=args.decode_attention)
        engine = Engine(model, config=engine_config, group=group)
        params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        mine_out = [out.token_ids for out in engine.generate([prompt_ids[i] for i in mine], params)]
    else:
        mine_out = generate(model, [prompt_ids[i] for i in mine], config, group=group, graphs=graphs)
    shares = gather_to_rank0(mine_out, group)
    if shares is None:
        return
    outputs = [out for share in shares for out in share]  # rank order = input order
    for text, ids, out in zip(texts, prompt_ids, outputs):
        completion = decode(tokenizer, out)
        if len(texts) == 1 and not args.json:
            log_rank0(completion)  # --engine's single prompt: what the stream would have printed
        elif args.json:
            record = {"prompt": text, "prompt_token_ids": ids, "token_ids": out, "text": completion}
            log_rank0(json.dumps(record, ensure_ascii=False))
        else:
            log_rank0(f"=== {text}\n{completion}")


def check_device(args: argparse.Namespace) -> None:
    """Raise ValueError if --fp8-gemm or --cuda-graphs on cannot run on the model's device."""
    device = check_fp8_gemm(args)
    if args.cuda_graphs == "on" and device.type != "cuda":
        raise ValueError(f"--cuda-graphs on: expected a CUDA device, got {device}; use --cuda-graphs auto or off")


def check_fp8_gemm(args: argparse.Namespace) -> torch.device:
    """The model's device; ValueError, naming the flag, if --fp8-gemm's backend cannot run there."""
    device = torch.device(args.device or default_device_dtype()[0])
    if args.fp8_weights and args.fp8_gemm != "auto":
        select_fp8_backend(args.fp8_gemm, device)  # raises, naming the flag, where that backend cannot run
    return device


def read_config(args: argparse.Namespace, path: Path) -> ModelConfig:
    """The checkpoint's config.json, checked against --max-seq-len and --fp8-weights."""
    config = path / "config.json"
    if not config.is_file():
        found = "does not exist" if not path.exists() else "is not a directory" if not path.is_dir() else "has no config.json"
        raise ValueError(f"--ckpt-path {path}: expected a Hugging Face checkpoint directory, but it {found}")
    cfg = ModelConfig.from_file(config)
    if args.max_seq_len is not None and args.max_seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--max-seq-len: expected at most max_position_embeddings={cfg.max_position_embeddings} ({config}), got {args.max_seq_len}")
    if args.fp8_weights and cfg.quant is None:
        raise ValueError(f"--fp8-weights: expected an FP8 checkpoint, but {config} has no quantization_config")
    return cfg


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values, then the non-blank lines of --input-file; the built-in prompt if neither is given."""
    texts = list(args.prompt)
    if args.input_file is not None:
        texts += [line for line in read_input_file(args.input_file).splitlines() if line.strip()]
        if not texts:
            raise ValueError(f"--input-file {args.input_file}: expected a prompt per line, but it holds only blank lines")
    return texts or [embedded.BUILTIN_PROMPT]


def read_input_file(path: Path) -> str:
    """--input-file's text; a ValueError says what is wrong with the file."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        found = f"is not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start}, line {line})"
    except FileNotFoundError:
        found = "does not exist"
    except IsADirectoryError:
        found = "is a directory"
    except OSError as e:
        found = f"is unreadable ({e.strerror})"
    raise ValueError(f"--input-file {path}: expected a UTF-8 text file, but it {found}")


def chat_loop(model, tokenizer, config: GenerationConfig, group, graphs) -> None:
    """Multi-turn chat: each reply joins the history (the chat format drops its reasoning).

    Rank 0 reads stdin and keeps the history; under expert parallelism it broadcasts what to do next
    and the other ranks, holding no prompt of their own, join every forward."""
    messages: list[dict] = []
    while True:
        prompt = next_chat_prompt(model, tokenizer, messages, config.max_new_tokens) if is_rank0() else None
        if group is not None:
            box = [prompt]
            dist.broadcast_object_list(box, src=0, group=group)
            prompt = box[0]
        if prompt == "exit":
            return
        if prompt is None:
            continue
        stream = TextStream(tokenizer)
        outputs = generate(model, [prompt] if is_rank0() else [], config, on_token=stream, group=group, graphs=graphs)
        stream.finish()
        if is_rank0():
            messages.append({"role": "assistant", "content": decode(tokenizer, outputs[0])})


def next_chat_prompt(model, tokenizer, messages: list[dict], max_new_tokens: int) -> list[int] | str | None:
    """Read one stdin line: the next prompt's ids, "exit" (/exit or end of input), or None (nothing to run)."""
    try:
        line = input(">>> ").strip()
    except EOFError:
        return "exit"
    if line == "/exit":
        return "exit"
    if line == "/clear":
        messages.clear()
        log_rank0("(history cleared)")
        return None
    if not line:
        return None
    messages.append({"role": "user", "content": line})
    ids = encode_messages(tokenizer, messages)
    if len(ids) + max_new_tokens > model.max_seq_len:
        messages.pop()
        log_rank0(
            f"error: the conversation needs {len(ids) + max_new_tokens} positions (with --max-new-tokens {max_new_tokens}), "
            f"beyond max_seq_len={model.max_seq_len}; /clear starts a new conversation", file=sys.stderr,
        )
        return None
    return ids


class TextStream:
    """on_token callback that prints a reply as it grows: decodes all ids so far and prints the new suffix."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = decode(self.tokenizer, self.ids)
        if not text.endswith("\ufffd"):  # otherwise a multi-byte character is still incomplete
            self._emit(text)

    def finish(self) -> None:
        self._emit(decode(self.tokenizer, self.ids))
        log_rank0()

    def _emit(self, text: str) -> None:
        log_rank0(text[len(self.printed) :], end="")
        self.printed = text
