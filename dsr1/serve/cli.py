"""The command line behind scripts/serve.py: load a checkpoint (or the embedded tiny default), build the
Engine, and serve the OpenAI API over HTTP until interrupted; under torchrun with --ep N every rank loads its
share of the experts and its own Engine, and rank 0 serves (dsr1/serve/distributed.py). Every bad flag is one
line `serve.py: error: ...` with exit status 2, before any weights load."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys

from dsr1.engine.engine import Engine, EngineConfig
from dsr1.engine.load import load_ep_model
from dsr1.generate_cli import DTYPES, POSITIVE, Parser, add_decode_args, add_ep_args, add_model_args, check_fp8_gemm, checked, checkpoint_dir, parallel_config, read_config
from dsr1.parallel.dist import init_distributed, is_rank0
from dsr1.serve.app import build_app, start
from dsr1.serve.distributed import HEARTBEAT_S, expert_parallel
from dsr1.serve.engine_loop import EngineLoop
from dsr1.serve.protocol import ServeContext
from dsr1.tokenizer import load_tokenizer

PORT = checked(int, lambda n: 0 <= n < 65536, "a port number in [0, 65535]")
SECONDS = checked(float, lambda s: s >= 0, "a number of seconds >= 0")
AT_LEAST_2 = checked(int, lambda n: n >= 2, "an integer >= 2")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="serve.py",
        description="Serve DeepSeek-R1 over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, "
        "/health, /metrics). Without --ckpt-path, serves the embedded tiny random-weight checkpoint.",
    )
    add_model_args(p)
    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    server.add_argument("--port", type=PORT, default=8000, help="port to listen on (default 8000)")
    server.add_argument("--served-model-name", help='the `model` clients name (default "dsr1", or the checkpoint directory\'s name)')
    server.add_argument("--max-concurrent", type=POSITIVE, default=256, help="generation requests in flight at once; more get 429 (default 256)")
    server.add_argument("--log-interval", type=SECONDS, default=5.0, help="seconds between progress lines while busy (0: none; default 5)")
    engine = p.add_argument_group("engine")
    engine.add_argument("--block-size", type=POSITIVE, default=EngineConfig.block_size, help=f"tokens per cache block (default {EngineConfig.block_size})")
    engine.add_argument("--num-blocks", type=AT_LEAST_2, help="cache blocks; default: a share of free GPU memory, or 256 MiB on CPU")
    engine.add_argument("--max-num-seqs", type=POSITIVE, default=EngineConfig.max_num_seqs, help=f"requests decoded together (default {EngineConfig.max_num_seqs})")
    engine.add_argument("--max-num-batched-tokens", type=POSITIVE, default=EngineConfig.max_num_batched_tokens,
                        help=f"prompt tokens prefilled per step (default {EngineConfig.max_num_batched_tokens})")
    engine.add_argument("--no-prefix-caching", action="store_true", help="do not reuse the cache blocks of prompts' shared prefixes")
    add_decode_args(engine)  # the engine's decode steps on one GPU; under --ep they run eagerly
    add_ep_args(p)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.attn_impl != "absorb":
        parser.error(f"--attn-impl {args.attn_impl}: the engine's paged cache holds MLA's latent rows; serve with --attn-impl absorb")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.ep != world:
        parser.error(f"--ep {args.ep} with WORLD_SIZE={world}: serve with one process per expert-parallel rank, "
                     f"torchrun --nproc-per-node {args.ep} scripts/serve.py --ep {args.ep} ...")
    try:
        run(args)
    except (ValueError, OSError, ImportError) as e:  # bad input: a checkpoint, a flag the machine can't serve, a busy port
        parser.error(str(e))
    except KeyboardInterrupt:
        print("serve.py: interrupted, stopped", file=sys.stderr)


def run(args: argparse.Namespace) -> None:
    rank, world, _ = init_distributed()
    check_fp8_gemm(args)
    if rank == 0:  # the other ranks serve through rank 0
        check_port(args.host, args.port)
    config = EngineConfig(
        args.block_size, args.num_blocks, args.max_num_seqs, args.max_num_batched_tokens, not args.no_prefix_caching, args.max_seq_len,
        cuda_graphs=args.cuda_graphs, compile_decode=args.compile_decode, decode_attention=args.decode_attention,
    )
    path = checkpoint_dir(args.ckpt_path, rank, world)
    cfg = read_config(args, path)
    tokenizer = load_tokenizer(path)
    model, group = load_ep_model(
        path, parallel_config(args), device=args.device, dtype=DTYPES.get(args.dtype), fp8=args.fp8_weights, gemm=args.fp8_gemm,
        attn_impl=args.attn_impl, max_seq_len=args.max_seq_len, progress=is_rank0(),
    )
    engine = Engine(model, tokenizer, config, group)
    front = engine if group is None else expert_parallel(engine)
    if front is None:  # a worker rank: rank 0 has stopped serving
        return
    name = args.served_model_name or ("dsr1" if args.ckpt_path is None else path.resolve().name)
    ctx = ServeContext(name, tokenizer, engine.max_model_len, cfg.vocab_size)
    heartbeat = None if group is None else HEARTBEAT_S
    asyncio.run(serve(EngineLoop(front, heartbeat_s=heartbeat, progress_s=args.log_interval), ctx, args))


async def serve(engine_loop: EngineLoop, ctx: ServeContext, args: argparse.Namespace) -> None:
    """Serve until cancelled (Ctrl-C), then stop the HTTP side and the engine thread."""
    engine_loop.start()
    runner, port = await start(build_app(engine_loop, ctx, args.max_concurrent), args.host, args.port)
    stats = engine_loop.snapshot.stats
    ranks = f" over {args.ep} expert-parallel ranks" if args.ep > 1 else ""
    print(f"serving {ctx.model_name!r} on http://{args.host}:{port}/v1 (context {ctx.max_model_len} tokens, "
          f"{stats.total_blocks} cache blocks of {args.block_size}{ranks})", file=sys.stderr, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        engine_loop.stop()


def check_port(host: str, port: int) -> None:
    """ValueError, naming the flags, unless this process can listen on host:port (checked before the weights load)."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
