"""The HTTP side (aiohttp): OpenAI's /v1/models, /v1/completions and /v1/chat/completions (JSON or
server-sent events), /health and /metrics. Generation goes through an EngineLoop; a client that goes
away (mid-stream or while waiting) aborts its requests, which frees their cache blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid

from aiohttp import web

from dsr1.serve import metrics
from dsr1.serve.engine_loop import EngineDead, EngineLoop
from dsr1.serve.protocol import ApiError, GenerateRequest, ServeContext, completion_logprobs, parse_chat, parse_completion, split_reasoning, usage

STATE = web.AppKey("state", object)


class ServerState:
    """What the handlers share: the engine loop, the model's context, the concurrency limit."""

    def __init__(self, engine: EngineLoop, ctx: ServeContext, max_concurrent: int):
        self.engine, self.ctx, self.max_concurrent, self.in_flight = engine, ctx, max_concurrent, 0

    @contextlib.contextmanager
    def slot(self):
        """One of max_concurrent generation requests at a time; 429 beyond."""
        if self.in_flight >= self.max_concurrent:
            raise ApiError(429, f"{self.in_flight} requests are in flight, the server's limit (--max-concurrent {self.max_concurrent}); retry later",
                           type="rate_limit_error", code="too_many_requests")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


BODY_BYTES_PER_TOKEN = 32  # a request body may hold this much per token of the context (a token id list: ~8), at least 1 MiB


def build_app(engine: EngineLoop, ctx: ServeContext, max_concurrent: int) -> web.Application:
    body_limit = max(1 << 20, BODY_BYTES_PER_TOKEN * ctx.max_model_len)  # a long-context prompt fits; a larger body gets 413
    app = web.Application(middlewares=[json_errors], client_max_size=body_limit)
    app[STATE] = ServerState(engine, ctx, max_concurrent)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", prometheus)
    return app


@web.middleware
async def json_errors(request: web.Request, handler):
    """ApiError and aiohttp's own HTTP errors (unknown path, wrong method) as OpenAI error bodies."""
    try:
        return await handler(request)
    except ApiError as e:
        return web.json_response(e.body(), status=e.status)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        why = e.text if e.status == 413 else e.reason  # 413: aiohttp's text gives the limit and the body's size
        return web.json_response(ApiError(e.status, f"{request.method} {request.path}: {why}").body(), status=e.status)


async def models(request: web.Request) -> web.Response:
    ctx = request.app[STATE].ctx
    card = {"id": ctx.model_name, "object": "model", "created": 0, "owned_by": "dsr1", "max_model_len": ctx.max_model_len}
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    error = request.app[STATE].engine.error
    return web.json_response({"status": "ok"} if error is None else {"status": "error", "error": repr(error)}, status=200 if error is None else 503)


async def prometheus(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.Response(text=metrics.render(state.engine.snapshot, state.ctx.model_name), content_type="text/plain")


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    req = parse_completion(await read_json(request), state.ctx)
    return await respond(request, req, CompletionView(req, state.ctx), "cmpl")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    req = parse_chat(await read_json(request), state.ctx)
    return await respond(request, req, ChatView(), "chatcmpl")


async def read_json(request: web.Request):
    try:
        return json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


async def outputs(engine: EngineLoop, request_id: str, req: GenerateRequest):
    """(prompt index, RequestOutput) as the engine produces them, until every prompt's request finished.
    Requests still running when the caller stops listening (a client gone) are aborted."""
    sink: asyncio.Queue = asyncio.Queue()
    ids = [f"{request_id}-{i}" for i in range(len(req.prompts))]
    live = set()
    try:
        for rid, prompt in zip(ids, req.prompts):
            engine.submit(rid, prompt, req.params, sink)
            live.add(rid)
        while live:
            item = await sink.get()
            if isinstance(item, ValueError):
                raise ApiError(400, f"the engine refused the request: {item}", "prompt")
            if isinstance(item, EngineDead):
                raise item
            if item.finished:
                live.discard(item.request_id)
            yield ids.index(item.request_id), item
    except EngineDead as e:
        raise ApiError(503, str(e), type="server_error") from None
    finally:
        for rid in live:
            engine.abort(rid)


async def respond(request: web.Request, req: GenerateRequest, view, prefix: str) -> web.StreamResponse:
    """Run `req` and answer with one JSON object, or with server-sent events (`data: {...}`, then `data: [DONE]`)."""
    state = request.app[STATE]
    head = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.ctx.model_name}
    completion_tokens = [0] * len(req.prompts)

    def counted(i: int, out) -> None:
        completion_tokens[i] = len(out.token_ids) if req.max_tokens else 0

    with state.slot():
        async with contextlib.aclosing(outputs(state.engine, head["id"], req)) as stream:
            if not req.stream:
                last = {}
                async for i, out in stream:
                    kept = last[i].prompt_logprobs if i in last else None  # in whichever output carried them
                    last[i] = dataclasses.replace(out, prompt_logprobs=kept) if kept and not out.prompt_logprobs else out
                    counted(i, out)
                choices = [view.full(i, last[i], req) for i in range(len(req.prompts))]
                body = {**head, "object": view.object, "choices": choices, "usage": usage(sum(req.prompt_lengths), sum(completion_tokens))}
                return web.json_response(body)
            first = await anext(stream)  # an error here is still a JSON 4xx: no headers have gone out
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)

            async def send(payload: dict) -> None:
                await response.write(f"data: {json.dumps(payload)}\n\n".encode())

            for choice in view.opening(req):
                await send({**head, "object": view.chunk_object, "choices": [choice]})
            try:
                async for i, out in prepend(first, stream):
                    counted(i, out)
                    choice = view.delta(i, out, req)
                    if choice is not None:
                        await send({**head, "object": view.chunk_object, "choices": [choice]})
                if req.include_usage:
                    await send({**head, "object": view.chunk_object, "choices": [], "usage": usage(sum(req.prompt_lengths), sum(completion_tokens))})
            except ApiError as e:  # after the headers: the error travels as an event
                await send(e.body())
            except ConnectionResetError:  # the client left; leaving the block aborts its requests
                return response
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response


async def prepend(first, rest):
    yield first
    async for item in rest:
        yield item


class CompletionView:
    """/v1/completions choices: text (after the echoed prompt), legacy logprobs, finish_reason."""

    object = chunk_object = "text_completion"

    def __init__(self, req: GenerateRequest, ctx: ServeContext):
        self.tokenizer = ctx.tokenizer
        self.sent_text = [0] * len(req.prompts)
        self.sent_tokens = [0] * len(req.prompts)
        self.offsets = [0] * len(req.prompts)
        self.echoed: set[int] = set()

    def full(self, i: int, out, req: GenerateRequest) -> dict:
        text = (req.prompt_texts[i] if req.echo else "") + (out.text if req.max_tokens else "")
        ids, entries = self._scored(i, out, req, 0, len(out.token_ids) if req.max_tokens else 0)
        logprobs = None if req.logprobs is None else completion_logprobs(self.tokenizer, ids, entries, 0)
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(out, req)}

    def opening(self, req: GenerateRequest) -> list[dict]:
        """Nothing: an echoed prompt goes out with its first output, which carries the prompt's logprobs."""
        return []

    def delta(self, i: int, out, req: GenerateRequest) -> dict | None:
        echo = req.echo and i not in self.echoed
        self.echoed.add(i)
        text = out.text if req.max_tokens else ""
        n_tokens = len(out.token_ids) if req.max_tokens else 0
        piece = (req.prompt_texts[i] if echo else "") + text[self.sent_text[i] :]
        ids, entries = self._scored(i, out, req, self.sent_tokens[i], n_tokens, prompt=echo)
        self.sent_text[i], self.sent_tokens[i] = len(text), n_tokens
        if not piece and not ids and not out.finished:
            return None
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs(self.tokenizer, ids, entries, self.offsets[i])
            self.offsets[i] += sum(map(len, logprobs["tokens"]))
        return {"index": i, "text": piece, "logprobs": logprobs, "finish_reason": finish_reason(out, req) if out.finished else None}

    @staticmethod
    def _scored(i: int, out, req: GenerateRequest, start: int, end: int, prompt: bool | None = None) -> tuple[list[int], list]:
        """Token ids and their logprob entries: prompt i's as the client sent it (when `prompt`), then generated [start, end)."""
        ids, entries = [], []
        if req.logprobs is None:
            return ids, entries
        if req.echo if prompt is None else prompt:
            sent = slice(int(req.bos_added[i]), None)  # without the BOS the server added
            ids, entries = out.prompt_token_ids[sent], (out.prompt_logprobs or [None] * len(out.prompt_token_ids))[sent]
        return ids + out.token_ids[start:end], entries + (out.logprobs or [])[start:end]


class ChatView:
    """/v1/chat/completions choices: the reply split into reasoning_content (before `</think>`) and content."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self):
        self.sent = ("", "")

    def full(self, i: int, out, req: GenerateRequest) -> dict:
        reasoning, content = split_reasoning(out.text if req.max_tokens else "", final=True)
        message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
        return {"index": i, "message": message, "logprobs": None, "finish_reason": finish_reason(out, req)}

    def opening(self, req: GenerateRequest) -> list[dict]:
        return [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]

    def delta(self, i: int, out, req: GenerateRequest) -> dict | None:
        reasoning, content = split_reasoning(out.text if req.max_tokens else "", final=out.finished)
        delta = {}
        if len(reasoning) > len(self.sent[0]):
            delta["reasoning_content"] = reasoning[len(self.sent[0]) :]
        if content and len(content) > len(self.sent[1]):
            delta["content"] = content[len(self.sent[1]) :]
        self.sent = (reasoning, content or "")
        if not delta and not out.finished:
            return None
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason(out, req) if out.finished else None}


def finish_reason(out, req: GenerateRequest) -> str:
    """The engine's reason; "length" when the client asked for max_tokens=0 (the prompt scored, nothing generated)."""
    return out.finish_reason if req.max_tokens else "length"


async def start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0: a free port); returns the runner (runner.cleanup() stops it) and the port.
    A client that disconnects cancels its handler, which aborts its requests."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, runner.addresses[0][1]
