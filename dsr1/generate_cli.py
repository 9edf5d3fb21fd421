"""The command line behind scripts/generate.py: load a checkpoint (or the embedded tiny default),
encode prompts, generate, and print streamed text, plain completions or one JSON object per prompt."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dsr1 import embedded
from dsr1.checkpoint.loader import load_model
from dsr1.generation import generate
from dsr1.model.attention import ATTN_IMPLS
from dsr1.tokenizer import decode, encode_messages, encode_prompt, load_tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Defaults that depend on what runs: R1's recommended sampling for a real checkpoint; a short greedy
# answer for the embedded random-weight model, whose output only shows that the pipeline runs.
CHECKPOINT_DEFAULTS = {"max_new_tokens": 256, "temperature": 0.6}
EMBEDDED_DEFAULTS = {"max_new_tokens": embedded.MAX_NEW_TOKENS, "temperature": 0.0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py",
        description="Generate text with DeepSeek-R1. Without --ckpt-path, runs a tiny random-weight checkpoint "
        "(built once into $XDG_CACHE_HOME/dsr1 or ~/.cache/dsr1) on a built-in prompt.",
    )
    model = p.add_argument_group("model")
    model.add_argument("--ckpt-path", help="Hugging Face checkpoint directory (config.json, safetensors, tokenizer)")
    model.add_argument("--device", help="default: cuda:$LOCAL_RANK when CUDA is available, else cpu")
    model.add_argument("--dtype", choices=DTYPES, help="activation/weight dtype; default bfloat16 on CUDA, float32 on CPU")
    model.add_argument("--attn-impl", choices=ATTN_IMPLS, default="absorb", help="absorb: cache the MLA latent (default); naive: per-head keys and values")
    model.add_argument("--fp8-weights", action="store_true", help="keep FP8 weights in memory and dequantize per matmul")
    model.add_argument("--max-seq-len", type=int, help="longest prompt + generation the model accepts; default max_position_embeddings")

    prompts = p.add_argument_group("prompts (default: the built-in prompt)")
    prompts.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    prompts.add_argument("--input-file", type=Path, help="one prompt per line (blank lines skipped), after any --prompt")
    prompts.add_argument("--interactive", action="store_true", help="multi-turn chat on stdin; /clear resets the history, /exit quits")
    prompts.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True, help="apply the R1 chat format (default); --no-chat feeds BOS + the raw prompt")

    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, help=f"default {CHECKPOINT_DEFAULTS['max_new_tokens']} ({EMBEDDED_DEFAULTS['max_new_tokens']} for the embedded default)")
    sampling.add_argument("--temperature", type=float, help=f"0 = greedy; default {CHECKPOINT_DEFAULTS['temperature']} as R1 recommends (0 for the embedded default)")
    sampling.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    sampling.add_argument("--seed", type=int, help="seed for sampling; fixed seed + prompts = same output")

    output = p.add_argument_group("output")
    output.add_argument("--json", action="store_true", help='one JSON object per prompt per line: {"prompt", "prompt_token_ids", "token_ids", "text"}')

    # Expert parallelism (--ep, --expert-placement, --all2all, --deepep-fp8-dispatch, --max-dispatch-tokens)
    # goes here as its own argument group; check_world_size() then accepts WORLD_SIZE > 1 when --ep is set.
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.interactive and (args.prompt or args.input_file or args.json or not args.chat):
        parser.error("--interactive reads prompts from stdin in the chat format; drop --prompt, --input-file, --json and --no-chat")
    try:
        check_world_size()
        run(args)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def check_world_size() -> None:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        raise ValueError(
            f"WORLD_SIZE={world_size}: several processes only help with expert parallelism (--ep), which "
            f"generate.py does not support yet; launch one process (torchrun --nproc-per-node 1)"
        )


def run(args: argparse.Namespace) -> None:
    texts = [] if args.interactive else read_prompts(args)  # before the slow load: a bad --input-file fails fast
    if args.ckpt_path is None:
        # The tiny model's ops are too small to gain from intra-op threads, and on a busy machine
        # threads that wait on each other made its 32-token decode 20x slower (0.7 s -> 17 s).
        torch.set_num_threads(1)
        path, defaults = embedded.tiny_checkpoint(), EMBEDDED_DEFAULTS
        print_rank0(f"no --ckpt-path: running the embedded tiny random-weight checkpoint {path}", file=sys.stderr)
    else:
        path, defaults = Path(args.ckpt_path), CHECKPOINT_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    tokenizer = load_tokenizer(path)
    model = load_model(
        path, device=args.device, dtype=DTYPES.get(args.dtype), fp8=args.fp8_weights, attn_impl=args.attn_impl,
        max_seq_len=args.max_seq_len, progress=is_rank0(),
    )
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.interactive:
        chat_loop(model, tokenizer, sampling)
        return
    prompt_ids = [encode_prompt(tokenizer, text, chat=args.chat) for text in texts]
    if len(texts) == 1 and not args.json:
        stream = TextStream(tokenizer)
        generate(model, prompt_ids, on_token=stream, **sampling)
        stream.finish()
        return
    outputs = generate(model, prompt_ids, **sampling)
    for text, ids, out in zip(texts, prompt_ids, outputs):
        completion = decode(tokenizer, out)
        if args.json:
            record = {"prompt": text, "prompt_token_ids": ids, "token_ids": out, "text": completion}
            print_rank0(json.dumps(record, ensure_ascii=False))
        else:
            print_rank0(f"=== {text}\n{completion}")


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values, then the non-blank lines of --input-file; the built-in prompt if neither is given."""
    texts = list(args.prompt)
    if args.input_file is not None:
        if not args.input_file.is_file():
            raise FileNotFoundError(f"--input-file {args.input_file} does not exist")
        texts += [line for line in args.input_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise ValueError(f"--input-file {args.input_file} holds no prompts (only blank lines)")
    return texts or [embedded.BUILTIN_PROMPT]


def chat_loop(model, tokenizer, sampling: dict) -> None:
    """Multi-turn chat: each reply joins the history (the chat format drops its reasoning)."""
    messages: list[dict] = []
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            return
        if line == "/exit":
            return
        if line == "/clear":
            messages.clear()
            print_rank0("(history cleared)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        stream = TextStream(tokenizer)
        try:
            out = generate(model, [encode_messages(tokenizer, messages)], on_token=stream, **sampling)[0]
        except ValueError as e:  # the conversation outgrew max_seq_len
            messages.pop()
            print_rank0(f"error: {e}; /clear starts a new conversation", file=sys.stderr)
            continue
        stream.finish()
        messages.append({"role": "assistant", "content": decode(tokenizer, out)})


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
        print_rank0()

    def _emit(self, text: str) -> None:
        print_rank0(text[len(self.printed) :], end="", flush=True)
        self.printed = text


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print_rank0(*args, **kwargs) -> None:
    """print() on rank 0 only, so a multi-process run prints each line once (unlike
    dsr1.parallel.dist.log_rank0, it streams without newlines and writes to stderr when asked)."""
    if is_rank0():
        print(*args, **kwargs)
