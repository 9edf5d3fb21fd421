"""A running server for the tests: dsr1.serve's app on a free port, its event loop in a background thread."""

from __future__ import annotations

import asyncio
import threading

from dsr1.serve.app import build_app, start
from dsr1.serve.engine_loop import EngineLoop
from dsr1.serve.protocol import ServeContext
from dsr1.tokenizer import load_tokenizer

VOCAB = 129280  # configs/tiny.json, R1's vocabulary
REPLY = "Let me think: 2 + 2 = 4.</think>\n\nThe answer is 4."  # what the scripted engine says, then EOS


class Server:
    """The app on 127.0.0.1:<free port>; `.engine` is the engine the EngineLoop owns (read it only while idle)."""

    def __init__(self, engine, max_model_len: int = 256, max_concurrent: int = 512, name: str = "dsr1", vocab: int = VOCAB, heartbeat_s: float | None = None):
        self.engine, self.loop = engine, asyncio.new_event_loop()
        self.engine_loop = EngineLoop(engine, heartbeat_s, progress_s=0).start()
        self.ctx = ServeContext(name, load_tokenizer(), max_model_len, vocab)
        app = build_app(self.engine_loop, self.ctx, max_concurrent)
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.runner, port = asyncio.run_coroutine_threadsafe(start(app, "127.0.0.1", 0), self.loop).result()
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.engine_loop.stop()
