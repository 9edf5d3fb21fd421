"""The engine's one thread: the Engine is not thread-safe, so a single background thread owns it.

The asyncio side calls `submit` and `abort`, which only put commands on a thread-safe queue. The
thread takes them, calls `engine.step()` while there is work, and hands every RequestOutput to the
submitting request's asyncio.Queue through `loop.call_soon_threadsafe`. With nothing to do it blocks
on the command queue (no spinning). It also keeps the numbers /metrics and the console line show.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

from dsr1.serve.metrics import progress_line

RATE_WINDOW_S = 10.0  # generated tokens/s is measured over this recent window


@dataclass
class Snapshot:
    """What the engine thread last saw: engine.stats() and generated tokens/s over RATE_WINDOW_S."""

    stats: object | None = None  # EngineStats
    tokens_per_s: float = 0.0
    at: float = 0.0  # time.monotonic() of the last step

    def current_rate(self) -> float:
        """tokens_per_s, or 0 once no step has run for a whole window (the engine went idle)."""
        return self.tokens_per_s if time.monotonic() - self.at < RATE_WINDOW_S else 0.0


@dataclass
class Refused:
    """A step's report of a request the engine took but then refused (an expert-parallel rank's add_request raised)."""

    request_id: str
    error: ValueError


class EngineDead(RuntimeError):
    """engine.step() raised: the server stops serving generation (/health answers 503)."""


class EngineLoop:
    """Runs `engine` (dsr1.engine.engine.Engine, or anything with its API) in a daemon thread.

    heartbeat_s: while idle, call engine.step() this often anyway (dsr1.serve.distributed's EPFront: an empty
    round keeps the worker ranks' wait within their timeout); None blocks until a command comes.
    progress_s: print a one-line summary to stderr this often while there is work (0: never).
    """

    def __init__(self, engine, heartbeat_s: float | None = None, progress_s: float = 5.0):
        self.engine, self.heartbeat_s, self.progress_s = engine, heartbeat_s, progress_s
        self.commands: queue.Queue = queue.Queue()
        self.sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}  # engine thread only
        self.snapshot = Snapshot(engine.stats())
        self.error: BaseException | None = None
        self._rate: deque[tuple[float, int]] = deque()  # (time, generated tokens so far)
        self._last_progress = 0.0
        self._thread = threading.Thread(target=self._run, name="dsr1-engine", daemon=True)

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the thread after the commands already queued (engine.close(), if it has one, runs there)."""
        self.commands.put(("stop",))
        self._thread.join()

    def submit(self, request_id: str, prompt_ids: list[int], params, sink: asyncio.Queue) -> None:
        """Queue a request; its outputs (or the ValueError add_request raised) arrive on `sink`."""
        if self.error is not None:
            raise EngineDead(f"the engine stopped: {self.error!r}")
        self.commands.put(("add", request_id, prompt_ids, params, asyncio.get_running_loop(), sink))

    def abort(self, request_id: str) -> None:
        """Stop a request and free its cache blocks; no more outputs reach its sink."""
        self.commands.put(("abort", request_id))

    def _run(self) -> None:
        try:
            while self._apply(self._next_commands()):
                if self.engine.has_unfinished_requests():
                    self._deliver(self.engine.step())
                elif self.heartbeat_s is not None:
                    self.engine.step()
                self._observe()
        except BaseException as e:  # noqa: BLE001  every waiting request learns why
            self.error = e
            for loop, sink in self.sinks.values():
                loop.call_soon_threadsafe(sink.put_nowait, EngineDead(f"the engine stopped: {e!r}"))
            raise
        finally:
            if hasattr(self.engine, "close"):
                self.engine.close()

    def _next_commands(self) -> list[tuple]:
        """Every queued command; with no work, wait for the first (up to heartbeat_s)."""
        commands = []
        if not self.engine.has_unfinished_requests():
            try:
                commands.append(self.commands.get(timeout=self.heartbeat_s))
            except queue.Empty:
                return commands
        while True:
            try:
                commands.append(self.commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, commands: list[tuple]) -> bool:
        """Add and abort requests; False on stop."""
        for command in commands:
            if command[0] == "stop":
                return False
            if command[0] == "abort":
                if self.sinks.pop(command[1], None) is not None:
                    self.engine.abort_request(command[1])
                continue
            _, request_id, prompt_ids, params, loop, sink = command
            try:
                self.engine.add_request(prompt_ids, params, request_id)
            except ValueError as e:
                loop.call_soon_threadsafe(sink.put_nowait, e)
                continue
            self.sinks[request_id] = (loop, sink)
        return True

    def _deliver(self, outputs: list) -> None:
        """Each RequestOutput to its request's sink; a Refused request gets its ValueError, as add_request's."""
        for out in outputs:
            done = isinstance(out, Refused) or out.finished
            target = self.sinks.pop(out.request_id, None) if done else self.sinks.get(out.request_id)
            if target is not None:
                loop, sink = target
                loop.call_soon_threadsafe(sink.put_nowait, out.error if isinstance(out, Refused) else out)

    def _observe(self) -> None:
        """Refresh the snapshot and tokens/s; print the progress line when due."""
        stats, now = self.engine.stats(), time.monotonic()
        self._rate.append((now, stats.generated_tokens))
        while len(self._rate) > 2 and now - self._rate[1][0] > RATE_WINDOW_S:
            self._rate.popleft()
        (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
        self.snapshot = Snapshot(stats, (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0, now)
        if self.progress_s and stats.running + stats.waiting and now - self._last_progress >= self.progress_s:
            self._last_progress = now
            print(progress_line(self.snapshot), file=sys.stderr, flush=True)

