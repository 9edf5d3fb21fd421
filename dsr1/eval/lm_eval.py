"""The `dsr1` model for lm-evaluation-harness 0.4.13 (`--model dsr1`, registered when dsr1.eval is imported).

Scores (loglikelihood, loglikelihood_rolling) through a chunked prefill into a cache, with logits only at
the scored positions of one chunk at a time, and generates with dsr1.engine.generation (generate_until).
Under torchrun with ep > 1 every rank runs the same requests and forwards in lockstep; the LM keeps
lm-eval's rank 0 / world size 1, so lm-eval returns results only on LOCAL_RANK 0 and never shards
documents across ranks.

b batch, s positions, c positions per prefill chunk, n scored tokens, m model dim, v vocabulary
"""

from __future__ import annotations

import inspect
import logging
import os

import lm_eval.models  # noqa: F401  keeps lm-eval's built-in models resolvable once a model is registered
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, warning_once
from tqdm import tqdm

from dsr1.config import GenerationConfig, ParallelConfig
from dsr1.engine.decode_graphs import make_graphs
from dsr1.engine.generation import chunk_starts, generate
from dsr1.engine.load import default_device_dtype, load_ep_model
from dsr1.parallel.dist import is_rank0
from dsr1.tokenizer import ASSISTANT, END_THINK, EOS, apply_chat_template, decode, encode_prompt, load_tokenizer

log = logging.getLogger(__name__)

AUTO_BATCH_SIZE = 8  # what batch_size=auto means: lm-eval's auto-tuning is not implemented
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")  # after normalize_gen_kwargs


@register_model("dsr1")
class DSR1LM(TemplateLM):
    """DeepSeek-R1 from a Hugging Face checkpoint directory.

    model_args: ckpt_path, dtype (auto|bfloat16|float16|float32), max_length (prompt + generation,
    default the checkpoint's max_position_embeddings), max_gen_toks (default for requests that set
    none), think_end_token / strip_thinking=True (score only the text after the last `</think>`; stop
    strings then only count after it), fp8 (keep FP8 weights in memory), attn_impl, and the
    expert-parallel flags ep, expert_placement, all2all, and cuda_graphs (auto|on|off: decode steps from
    CUDA graphs over a cache of max_length x batch_size, where the run allows it) and compile_decode=True
    (their decoder blocks through torch.compile: the same function, faster), prefill_chunk (positions
    per forward when scoring or prefilling; default GenerationConfig's). batch_size,
    max_batch_size and device come from lm-eval's own flags.
    """

    def __init__(
        self,
        ckpt_path: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        think_end_token: str | None = None,
        strip_thinking: bool = False,
        fp8: bool = False,
        attn_impl: str = "absorb",
        ep: int = 1,
        expert_placement: str = ParallelConfig.expert_placement,
        all2all: str = ParallelConfig.all2all,
        cuda_graphs: str = "auto",
        compile_decode: bool = False,
        prefill_chunk: int = GenerationConfig.prefill_chunk,
        **unknown,
    ):
        super().__init__()
        if unknown:
            known = [name for name in inspect.signature(DSR1LM).parameters if name != "unknown"]
            raise ValueError(f"--model_args {sorted(unknown)} not understood by the dsr1 model; it accepts {known}")
        if not ckpt_path:
            raise ValueError("--model_args ckpt_path=DIR is required: a Hugging Face DeepSeek-R1 checkpoint directory")
        if dtype not in DTYPES:
            raise ValueError(f"--model_args dtype={dtype!r}; expected one of {list(DTYPES)}")
        self.tokenizer = load_tokenizer(ckpt_path)
        self._device = resolve_device(device)
        self._max_gen_toks = int(max_gen_toks)
        self._batch_size = resolve_batch_size(batch_size, max_batch_size)
        self.prefill_chunk = int(prefill_chunk)
        if self.prefill_chunk < 1:
            raise ValueError(f"--model_args prefill_chunk={prefill_chunk}: expected an integer >= 1 (prompt tokens per prefill forward)")
        self.think_end_token = think_end_token or (END_THINK if strip_thinking else None)
        parallel = ParallelConfig(int(ep), expert_placement, all2all)
        # Under torchrun (ep > 1) every rank runs this, then the same requests in lockstep.
        self.model, self.group = load_ep_model(
            ckpt_path, parallel, device=self._device, dtype=DTYPES[dtype], fp8=fp8, attn_impl=attn_impl,
            max_seq_len=int(max_length) if max_length else None, progress=is_rank0(),
        )
        self._max_length = self.model.max_seq_len  # default: the checkpoint's max_position_embeddings
        self.graphs = make_graphs(self.model, cuda_graphs, self._max_length, self.batch_size, self.group, bool(compile_decode))

    # -- what lm-eval reads -------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id  # DeepSeek conditions an empty context on BOS, never EOS

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> str:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str:
        return "dsr1.tokenizer.apply_chat_template (DeepSeek-R1)"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The R1 chat format; without a generation prompt a final assistant turn is continued (lm-eval's gen_prefix)."""
        if add_generation_prompt or not chat_history or chat_history[-1]["role"] != "assistant":
            return apply_chat_template(chat_history, add_generation_prompt)
        return apply_chat_template(chat_history[:-1], add_generation_prompt=False) + ASSISTANT + chat_history[-1]["content"]

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Exactly one BOS first (even if `string` already starts with it), unless add_special_tokens=False."""
        if add_special_tokens is False:
            return self.tokenizer.encode(string, add_special_tokens=False)
        return encode_prompt(self.tokenizer, string, chat=False)

    def tok_decode(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids)

    # -- scoring ------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (key or None, context ids, continuation ids) -> (sum of continuation log-probs, is greedy)."""
        coll = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        results = []
        pbar = tqdm(total=len(requests), desc="dsr1 loglikelihood", disable=disable_tqdm or not is_rank0())
        for chunk in coll.get_batched(n=self.batch_size):
            for key, context, continuation in chunk:
                if len(continuation) > self.max_length:
                    raise ValueError(f"a continuation of {len(continuation)} tokens does not fit max_length={self.max_length}; raise --model_args max_length")
            # Keep the last max_length inputs; the final token is only ever a target.
            inputs = [(context + continuation)[-(self.max_length + 1) :][:-1] for _, context, continuation in chunk]
            scores = self._score(inputs, [continuation for _, _, continuation in chunk])
            for (key, _, _), result in zip(chunk, scores):
                results.append(result)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, result)
                pbar.update(1)
        pbar.close()
        return coll.get_original(results)

    @torch.inference_mode()
    def _score(self, inputs: list[list[int]], targets: list[list[int]]) -> list[tuple[float, bool]]:
        """Right-padded inputs, prefilled into a cache in chunks of prefill_chunk positions -> per row, the
        sum of log p(targets) at its last len(targets) positions, and whether each is the argmax. Logits
        exist only for one row's scored positions within one chunk ([<= chunk, v]), never [b, s, v]."""
        b, s = len(inputs), max(map(len, inputs))
        tokens = torch.full((b, s), self.eot_token_id, dtype=torch.long)  # [b, s]
        for i, ids in enumerate(inputs):
            tokens[i, : len(ids)] = torch.tensor(ids)
        tokens = tokens.to(self.device)
        cache = self.model.new_cache(b, s)
        sums, greedy = [0.0] * b, [True] * b
        first = [len(ids) - len(t) for ids, t in zip(inputs, targets)]  # each row's first scored position
        for a in chunk_starts(s, self.prefill_chunk, self.group):  # the same on every rank: they run the same requests
            piece = tokens[:, a : a + self.prefill_chunk]  # [b, c]
            first_only = torch.zeros(b, dtype=torch.long, device=self.device)  # [b]: the head runs on our slices instead
            _, h = self.model(piece, a, cache, logits_at=first_only, return_hidden=True)  # h [b, c, m], final-normed
            for i, (ids, target) in enumerate(zip(inputs, targets)):
                lo, hi = max(first[i], a), min(len(ids), a + piece.shape[1])
                if lo >= hi:
                    continue
                logprobs = torch.log_softmax(self.model.head(h[i, lo - a : hi - a]).float(), dim=-1)  # [n, v]
                want = torch.tensor(target[lo - first[i] : hi - first[i]], device=logprobs.device)  # [n]
                sums[i] += float(logprobs.gather(-1, want[:, None]).sum())
                greedy[i] = greedy[i] and bool((logprobs.argmax(-1) == want).all())
        return list(zip(sums, greedy))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of max_length tokens (the first after BOS)."""
        results = []
        for (string,) in tqdm([r.args for r in requests], desc="dsr1 loglikelihood_rolling", disable=disable_tqdm or not is_rank0()):
            tokens = self.tok_encode(string, add_special_tokens=False)
            windows = get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1)
            scores = self._loglikelihood_tokens([(None, *make_disjoint_window(w)) for w in windows], disable_tqdm=True)
            total = sum(score for score, _ in scores)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return results

    # -- generation ---------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched generation, longest contexts first; each batch shares its gen_kwargs."""
        args = [r.args for r in requests]
        encoded = {context: self.tok_encode(context) for context, _ in args}
        coll = Collator(args, sort_fn=lambda a: (-len(encoded[a[0]]), a[0]), group_by="gen_kwargs", group_fn=lambda a: a[1])
        results = []
        pbar = tqdm(total=len(args), desc="dsr1 generate_until", disable=disable_tqdm or not is_rank0())
        for chunk in coll.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            ignored = sorted(set(kwargs) - set(GEN_KWARGS))
            if ignored:
                warning_once(log, f"dsr1 ignores gen_kwargs {ignored}; it understands {list(GEN_KWARGS)}")
            until = handle_stop_sequences(kwargs["until"], eos=EOS)
            max_new = kwargs["max_gen_toks"]
            config = GenerationConfig(
                max_new,
                temperature=float(kwargs.get("temperature", 0.0)) if kwargs["do_sample"] else 0.0,
                top_p=float(kwargs.get("top_p", 1.0)),
                eos_id=self.eot_token_id,
                prefill_chunk=self.prefill_chunk,
            )
            prompts = [self._fit(encoded[c], max_new) for c in contexts]
            should_stop = StopStrings(self.tokenizer, until, self.think_end_token)
            outputs = generate(self.model, prompts, config, should_stop=should_stop, group=self.group, graphs=self.graphs)
            for context, gen_kwargs, ids in zip(contexts, all_kwargs, outputs):
                text = postprocess_generated_text(self.tok_decode(ids), until, self.think_end_token)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                pbar.update(1)
        pbar.close()
        return coll.get_original(results)

    def _fit(self, ids: list[int], max_new: int) -> list[int]:
        """Drop the oldest context tokens (never the BOS) so context + max_new fits max_length."""
        if max_new >= self.max_length:
            raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt within max_length={self.max_length}; raise --model_args max_length")
        room = self.max_length - max_new
        if len(ids) <= room:
            return ids
        log.warning("context of %d tokens + max_gen_toks=%d exceeds max_length=%d; keeping BOS + the last %d context tokens", len(ids), max_new, self.max_length, room - 1)
        return ids[:1] + ids[len(ids) - room + 1 :]


class StopStrings:
    """should_stop for dsr1.engine.generation.generate: a row stops once its text holds any stop string.

    Only a tail of the generated ids is decoded each step (long enough to hold the longest stop string
    at one byte per token). With think_end_token, stop strings count only after it: the reasoning
    before it is dropped before scoring and may contain them.
    """

    def __init__(self, tokenizer, until: list[str], think_end_token: str | None):
        self.tokenizer, self.until, self.think_end_token = tokenizer, [s for s in until if s], think_end_token
        self.window = 4 * max(map(len, [*self.until, think_end_token or ""]), default=1) + 2
        self.answer_start: dict[int, int] = {}  # row -> index of its first token after think_end_token

    def __call__(self, row: int, ids: list[int]) -> bool:
        if self.think_end_token and row not in self.answer_start:
            if self.think_end_token in decode(self.tokenizer, ids[-self.window :]):
                self.answer_start[row] = len(ids)
            return False
        tail = decode(self.tokenizer, ids[max(self.answer_start.get(row, 0), len(ids) - self.window) :])
        return any(s in tail for s in self.until)


def resolve_device(device: str | None) -> str:
    """lm-eval's CLI always passes a device (default cuda:0).

    None -> cuda when available, else cpu. cuda requested without CUDA -> cpu, with a warning (the CLI's
    default must not fail on CPU machines). Under torchrun any cuda device becomes cuda:$LOCAL_RANK.
    """
    if device is None:
        return default_device_dtype()[0]
    if torch.device(device).type != "cuda":
        return device
    if not torch.cuda.is_available():
        log.warning("device=%s requested (lm-eval's default) but CUDA is not available; running on cpu. Pass --device cpu to silence this.", device)
        return "cpu"
    return default_device_dtype()[0] if "LOCAL_RANK" in os.environ else device


def resolve_batch_size(batch_size: int | str, max_batch_size: int | None) -> int:
    """int, or lm-eval's 'auto' / 'auto:N', which mean AUTO_BATCH_SIZE (capped by max_batch_size)."""
    if str(batch_size).startswith("auto"):
        return min(AUTO_BATCH_SIZE, int(max_batch_size or AUTO_BATCH_SIZE))
    try:
        size = int(batch_size)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"--batch_size {batch_size!r}: expected a positive integer, 'auto' or 'auto:N'")
    return size
