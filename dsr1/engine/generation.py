"""Batched autoregressive generation: a chunked prefill over right-padded prompts, then token-by-token
decode with a KV cache (the absorbed latent cache unless the model was built with attn_impl="naive").

b batch (prompts on this rank), l longest prompt, v vocabulary
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from dsr1.config import GenerationConfig
from dsr1.engine.decode_graphs import DecodeGraphs
from dsr1.model.transformer import Transformer
from dsr1.parallel.dist import all_reduce_max


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    config: GenerationConfig,
    on_token: Callable[[int, int], None] | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    group: ProcessGroup | None = None,
    graphs: DecodeGraphs | None = None,
) -> list[list[int]]:
    """Generated token ids per prompt (EOS not included), sampled as `config` says (dsr1.config.GenerationConfig).

    A row stops at config.eos_id (default: the model config's EOS), after config.max_new_tokens, or when
    `should_stop(row, ids so far)` says so. `on_token(row, id)` sees each kept token as it is chosen.
    With a process group, every rank runs the same number of forward passes (an expert-parallel
    MoE needs all ranks in each dispatch): the loop goes on while any rank has an unfinished row,
    and a rank with no prompts feeds an empty batch. With `graphs`, decode steps replay CUDA graphs
    (dsr1/engine/decode_graphs.py) when the batch fits a bucket and the sequences fit its cache.
    """
    max_new_tokens = config.max_new_tokens
    _check_prompts(model, prompts, max_new_tokens)
    eos_id = model.cfg.eos_token_id if config.eos_id is None else config.eos_id
    device = model.embed.weight.device
    b = len(prompts)
    if max_new_tokens == 0 or (b == 0 and group is None):
        return [[] for _ in prompts]
    lengths = [len(p) for p in prompts]
    max_len = max(lengths, default=1) + max_new_tokens
    if graphs is not None and not _all_fit(graphs.bucket(b) is not None and max_len <= graphs.max_len, group):
        graphs = None  # too many rows or too long for the captured graphs (on some rank): decode eagerly
    cache = graphs.prepare(b) if graphs is not None else model.new_cache(b, max_len)
    gen = None if config.seed is None else torch.Generator(device).manual_seed(config.seed)

    tokens = torch.zeros(b, max(lengths, default=1), dtype=torch.long)  # [b, l], right-padded
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    lengths_t = torch.tensor(lengths, dtype=torch.long, device=device)  # [b]
    logits = prefill(model, tokens.to(device), lengths_t, cache, config.prefill_chunk, group)  # [b, v]

    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * b
    # What each row feeds next. A finished row re-feeds its last token at its last position, rewriting
    # one cache slot with what it already holds, so the batch shape never changes.
    last_token = [p[-1] for p in prompts]
    last_pos = [n - 1 for n in lengths]
    while True:
        chosen = sample(logits, config.temperature, config.top_p, gen).tolist()
        for i, token in enumerate(chosen):
            if done[i]:
                continue
            if token == eos_id:
                done[i] = True
                continue
            out[i].append(token)
            last_token[i], last_pos[i] = token, lengths[i] + len(out[i]) - 1
            if on_token is not None:
                on_token(i, token)
            done[i] = len(out[i]) >= max_new_tokens or (should_stop is not None and should_stop(i, out[i]))
        if not _any_unfinished(done, group):
            return out
        step_tokens = torch.tensor(last_token, dtype=torch.long, device=device).view(b, 1)  # [b, 1]
        start_pos = torch.tensor(last_pos, dtype=torch.long, device=device)  # [b]
        if graphs is not None:
            logits = graphs.step(step_tokens, start_pos)
        else:
            logits = model(step_tokens, start_pos, cache, logits_at=torch.zeros(b, dtype=torch.long, device=device))


def prefill(model: Transformer, tokens: Tensor, lengths: Tensor, cache: list, chunk: int, group: ProcessGroup | None = None) -> Tensor:
    """Write right-padded prompts tokens [b, l] (real lengths `lengths` [b]) into `cache` in forwards of at
    most `chunk` positions -> logits [b, v] fp32 at each row's last prompt token.

    Peak activations follow the chunk, not the prompt; each chunk's MoE is split further by the
    dispatcher's max_tokens. Causal attention keeps each row exact; pad keys sit past the row's end and
    are overwritten in decode. With a process group every rank runs as many forwards as the longest
    batch on any rank needs (each MoE layer's dispatch is a collective), feeding empty batches once its
    own prompts are in.
    """
    b, l = tokens.shape
    logits = torch.zeros(b, model.cfg.vocab_size, dtype=torch.float32, device=tokens.device)  # [b, v]
    last = lengths - 1  # [b]
    for a in chunk_starts(l if b else 0, chunk, group):
        if a >= l:
            model(tokens[:0, :1], 0, cache, logits_at=last[:0])  # nothing left here; other ranks still dispatch
            continue
        piece = tokens[:, a : a + chunk]  # [b, <= chunk]
        at = (last - a).clamp(0, piece.shape[1] - 1)  # [b]: the last token's index for rows that end in this chunk
        here = (last >= a) & (last < a + piece.shape[1])  # [b]
        chunk_logits = model(piece, a, cache, logits_at=at)  # [b, v]
        logits = torch.where(here.unsqueeze(1), chunk_logits, logits)
    return logits


def chunk_starts(length: int, chunk: int, group: ProcessGroup | None = None) -> range:
    """Start positions of the prefill forwards over `length` positions in chunks of `chunk`; with a group,
    as many as the longest on any rank needs (starts past `length` are this rank's empty forwards)."""
    n = -(-length // chunk)
    if group is not None:
        n = all_reduce_max(n, group)
    return range(0, n * chunk, chunk)


def sample(logits: Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> Tensor:
    """logits [b, v] -> token ids [b]: argmax at temperature 0, else a draw from the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [b, v]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does.
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _all_fit(fits: bool, group: ProcessGroup | None) -> bool:
    """Whether this rank's batch (with a group: every rank's) fits the CUDA graphs; ranks must agree, as a
    graph step and an eager one make different collectives."""
    return fits if group is None else not all_reduce_max(int(not fits), group)


def _any_unfinished(done: list[bool], group: ProcessGroup | None) -> bool:
    """Whether this rank (or, with a group, any rank) still has a row to decode."""
    unfinished = not all(done)
    return unfinished if group is None else bool(all_reduce_max(int(unfinished), group))


def _check_prompts(model: Transformer, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Raise, naming the flags, unless every prompt has tokens and fits max_seq_len with max_new_tokens."""
    limit = model.max_seq_len
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} has no tokens; every prompt starts with BOS")
        if len(p) + max_new_tokens > limit:
            hint = (
                f"raise --max-seq-len (up to max_position_embeddings={model.cfg.max_position_embeddings}), "
                if limit < model.cfg.max_position_embeddings
                else ""
            )
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with --max-new-tokens {max_new_tokens} it needs "
                f"{len(p) + max_new_tokens} positions, beyond max_seq_len={limit}; "
                f"{hint}shorten the prompt or lower --max-new-tokens"
            )
