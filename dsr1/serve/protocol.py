"""The OpenAI wire format: requests checked field by field into token ids and SamplingParams, and the
response pieces (logprobs, usage, the reasoning/answer split of R1's chat replies).

Every bad field raises ApiError, which the app turns into OpenAI's error body
`{"error": {"message", "type", "param", "code"}}` with a 4xx status naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dsr1.engine.sampling import SamplingParams
from dsr1.tokenizer import END_THINK, encode_messages

MAX_LOGPROBS = 20  # OpenAI's limit for `logprobs` (completions) and `top_logprobs` (chat)
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator takes
# Fields that clients send at their neutral value; accepted and ignored at that value only.
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "best_of": 1, "suffix": None}
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options", "user", "ignore_eos"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "logprobs", "add_special_tokens"} | set(NEUTRAL)
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"} | set(NEUTRAL)


class ApiError(Exception):
    """A request the server refuses: HTTP `status` and OpenAI's error object, `param` naming the field."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServeContext:
    """What request checks need to know about the served model."""

    model_name: str
    tokenizer: object
    max_model_len: int  # prompt + generated tokens per sequence
    vocab_size: int


@dataclass
class GenerateRequest:
    """One /v1/completions or /v1/chat/completions request, checked: one engine request per prompt."""

    prompts: list[list[int]]
    prompt_texts: list[str]  # what `echo` returns for each prompt
    params: SamplingParams  # what the engine runs (max_tokens >= 1)
    max_tokens: int  # what the client asked for (0: score the prompt only)
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None
    prompt_lengths: list[int] = field(default_factory=list)
    bos_added: list[bool] = field(default_factory=list)  # per completion prompt: the server put a BOS before it (echo leaves it out)


class Fields:
    """Typed access to a JSON request body; every error names the field."""

    def __init__(self, body, allowed: set[str]):
        if not isinstance(body, dict):
            raise ApiError(400, f"expected a JSON object as the request body, got {type(body).__name__}")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r}; this server accepts {sorted(allowed)}", unknown[0])
        for name, neutral in NEUTRAL.items():
            if body.get(name, neutral) not in (neutral, None, {}):
                raise ApiError(400, f"{name}={body[name]!r} is not supported; omit it or send {neutral!r}", name)
        self.body = body

    def get(self, name: str, default=None):
        value = self.body.get(name)
        return default if value is None else value

    def integer(self, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
        value = self.get(name, default)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < lo or hi is not None and value > hi):
            span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ApiError(400, f"{name}: expected an integer {span}, got {value!r}", name)
        return value

    def number(self, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
        value = self.get(name, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value > hi or value < lo or lo_open and value == lo:
            raise ApiError(400, f"{name}: expected a number in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}", name)
        return float(value)

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise ApiError(400, f"{name}: expected true or false, got {value!r}", name)
        return value

    def stop(self) -> tuple[str, ...]:
        value = self.get("stop", [])
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ApiError(400, f"stop: expected a non-empty string or a list of them, got {value!r}", "stop")
        return tuple(stops)


def check_model(fields: Fields, ctx: ServeContext) -> None:
    """`model` may be omitted; otherwise it must name the served model (404 model_not_found, as OpenAI)."""
    model = fields.get("model", ctx.model_name)
    if model != ctx.model_name:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {ctx.model_name!r} (GET /v1/models)", "model", code="model_not_found")


def sampling(fields: Fields, ctx: ServeContext, longest_prompt: int, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
    """SamplingParams from the fields every endpoint shares; max_tokens None: as many as fit the context."""
    if fields.integer("n", 1, 1) != 1:
        raise ApiError(400, f"n: only n=1 is supported, got {fields.get('n')!r}; send the request n times", "n")
    room = ctx.max_model_len - longest_prompt
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise ApiError(400, f"max_tokens={max_tokens} with a prompt of {longest_prompt} tokens needs {longest_prompt + max_tokens} positions, "
                       f"beyond the context of {ctx.max_model_len}; lower max_tokens to at most {room}", "max_tokens")
    seed = fields.integer("seed", None, SEED_RANGE[0], SEED_RANGE[1] - 1)
    top_k = fields.integer("top_k", 0, -1)  # -1 (vLLM) and 0 both mean every token
    return SamplingParams(
        max_tokens=max(max_tokens, 1), temperature=fields.number("temperature", 1.0, 0.0, 2.0), top_p=fields.number("top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=max(top_k, 0), seed=seed, stop=fields.stop(), ignore_eos=fields.boolean("ignore_eos"), logprobs=logprobs, prompt_logprobs=prompt_logprobs,
    )


def stream_options(fields: Fields, stream: bool) -> bool:
    """stream_options.include_usage: a last chunk with usage and no choices."""
    options = fields.get("stream_options", {})
    if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, f"stream_options: expected {{\"include_usage\": true|false}}, got {options!r}", "stream_options")
    if options and not stream:
        raise ApiError(400, "stream_options: only allowed with stream=true", "stream_options")
    return options.get("include_usage", False)


def parse_completion(body, ctx: ServeContext) -> GenerateRequest:
    """POST /v1/completions: prompt as a string, a token-id list, or a list of either.

    R1 always sees a BOS first (as DeepSeek's own inference and `--model dsr1` feed it): a prompt that does not
    start with one gets one, unless add_special_tokens is false (vLLM's field). The response leaves that BOS out
    (echo, logprobs), so the client's own token positions stay where its tokenizer put them."""
    fields = Fields(body, COMPLETION_FIELDS)
    check_model(fields, ctx)
    prompt = fields.get("prompt")
    items = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
    add_bos = fields.boolean("add_special_tokens", default=True)
    prompts, texts, bos_added = [], [], []
    for item in items:
        if isinstance(item, str) and item:
            ids, text = encode_text(ctx.tokenizer, item), item
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < ctx.vocab_size for t in item):
            ids, text = list(item), ctx.tokenizer.decode(item)  # special tokens kept: the echoed text is its logprobs' tokens joined
        else:
            raise ApiError(400, f"prompt: expected a non-empty string, a list of token ids in [0, {ctx.vocab_size}), or a list of those; got {item!r:.80}", "prompt")
        bos_added.append(add_bos and ids[0] != ctx.tokenizer.bos_token_id)
        prompts.append([ctx.tokenizer.bos_token_id] * bos_added[-1] + ids)
        texts.append(text)
    check_prompt_lengths(prompts, ctx, "prompt")
    stream, echo = fields.boolean("stream"), fields.boolean("echo")
    logprobs = fields.integer("logprobs", None, 0, MAX_LOGPROBS)
    max_tokens = fields.integer("max_tokens", 16, 0)
    params = sampling(fields, ctx, max(map(len, prompts)), max_tokens, logprobs, logprobs if echo else None)
    return GenerateRequest(prompts, texts, params, max_tokens, stream, stream_options(fields, stream), echo, logprobs, list(map(len, prompts)), bos_added)


def parse_chat(body, ctx: ServeContext) -> GenerateRequest:
    """POST /v1/chat/completions: messages in the R1 chat format; the reply opens inside `<think>`."""
    fields = Fields(body, CHAT_FIELDS)
    check_model(fields, ctx)
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"messages: expected a non-empty list of {{role, content}} objects, got {messages!r:.80}", "messages")
    try:
        ids = encode_messages(ctx.tokenizer, [chat_message(m, i) for i, m in enumerate(messages)])
    except ValueError as e:
        raise ApiError(400, f"messages: {e}", "messages") from None
    check_prompt_lengths([ids], ctx, "messages")
    if fields.get("logprobs", False) is not False or fields.get("top_logprobs") is not None:
        raise ApiError(400, "logprobs: not supported on /v1/chat/completions; use /v1/completions with the prompt's token ids", "logprobs")
    stream = fields.boolean("stream")
    max_tokens = fields.integer("max_completion_tokens", None, 0)
    max_tokens = fields.integer("max_tokens", max_tokens, 0)
    params = sampling(fields, ctx, len(ids), max_tokens, None, None)
    return GenerateRequest([ids], [""], params, params.max_tokens if max_tokens is None else max_tokens, stream, stream_options(fields, stream), prompt_lengths=[len(ids)])


def chat_message(message, i: int) -> dict:
    """{role, content} with content a string or OpenAI's list of {"type": "text", "text"} parts."""
    if not isinstance(message, dict):
        raise ValueError(f"message {i}: expected an object with role and content, got {message!r:.80}")
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    return {"role": message.get("role"), "content": content}


def encode_text(tokenizer, text: str) -> list[int]:
    """A completion prompt's text as the tokenizer splits it (parse_completion adds the BOS)."""
    return tokenizer.encode(text, add_special_tokens=False) or [tokenizer.bos_token_id]


def check_prompt_lengths(prompts: list[list[int]], ctx: ServeContext, param: str) -> None:
    """Each prompt must leave room for at least one generated token."""
    for ids in prompts:
        if len(ids) >= ctx.max_model_len:
            raise ApiError(400, f"{param}: {len(ids)} tokens, but the context holds {ctx.max_model_len} (prompt + completion); "
                           f"shorten it or restart the server with a larger --max-seq-len", param)


def completion_logprobs(tokenizer, ids: list[int], entries: list, offset: int) -> dict:
    """OpenAI's legacy logprobs object for `ids` (entries: a TokenLogprob or None each), text offsets from `offset`.

    top_logprobs holds the top N and the chosen token, keyed by decoded text (lm-eval reads
    token_logprobs and top_logprobs)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, entry in zip(ids, entries):
        text = tokenizer.decode([token_id])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        token_logprobs.append(None if entry is None else entry.logprob)
        top.append(None if entry is None else {tokenizer.decode([t]): lp for t, lp in [*entry.top, (entry.token_id, entry.logprob)]})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def split_reasoning(text: str, final: bool) -> tuple[str, str | None]:
    """(reasoning_content, content) of a reply generated after R1's `<think>\\n`: the text before `</think>`
    and after it (None while no `</think>` has come). Mid-stream a tail that may begin `</think>` is held back."""
    head, sep, tail = text.partition(END_THINK)
    if sep:
        return head, tail
    if not final:
        for k in range(len(END_THINK) - 1, 0, -1):
            if head.endswith(END_THINK[:k]):
                return head[:-k], None
    return head, None
