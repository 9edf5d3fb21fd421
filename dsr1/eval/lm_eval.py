"""The `dsr1` model for lm-evaluation-harness 0.4.13 (`--model dsr1`, registered when dsr1.eval is imported).

Scores (loglikelihood, loglikelihood_rolling) through a chunked prefill into a cache, with logits only at
the scored positions of one chunk at a time, and generates (generate_until) with all requests in one serving
engine (dsr1.engine.engine: continuous batching, prefix caching; dsr1/eval/until.py drives it).
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
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, warning_once
from tqdm import tqdm

from dsr1.config import GenerationConfig, ParallelConfig
from dsr1.embedded import tiny_checkpoint
from dsr1.engine.engine import Engine, EngineConfig, SamplingParams
from dsr1.engine.generation import chunk_starts
from dsr1.engine.load import default_device_dtype, load_ep_model
from dsr1.eval.until import THINK_CUTOFFS, answer, run_requests
from dsr1.parallel.dist import is_rank0
from dsr1.tokenizer import ASSISTANT, END_THINK, EOS, apply_chat_template, decode, encode_prompt, load_tokenizer

log = logging.getLogger(__name__)

AUTO_BATCH_SIZE = 8  # what batch_size=auto means: lm-eval's auto-tuning is not implemented
DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")  # after normalize_gen_kwargs


@register_model("dsr1")
class DSR1LM(TemplateLM):
    """DeepSeek-R1 from a Hugging Face checkpoint directory.

    model_args: ckpt_path (default: the embedded tiny checkpoint, dsr1.embedded), dtype
    (auto|bfloat16|float16|float32), max_length (prompt + generation, default the checkpoint's
    max_position_embeddings), max_gen_toks (default for requests that set none), think_end_token /
    strip_thinking=True (score only the text after the last `</think>`; stop strings then only count after
    it) with think_cutoff (empty: a generation without it scores as no answer; keep: all of it), fp8 (keep
    FP8 weights in memory), attn_impl (generation needs absorb), the expert-parallel flags ep,
    expert_placement, all2all, prefill_chunk (positions per forward when scoring or prefilling; default
    GenerationConfig's), and the engine's block_size, num_blocks, max_num_seqs (default batch_size) and
    prefix_caching. batch_size, max_batch_size and device come from lm-eval's own flags.
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
        prefill_chunk: int = GenerationConfig.prefill_chunk,
        think_cutoff: str = "empty",
        block_size: int = EngineConfig.block_size,
        num_blocks: int | None = None,
        max_num_seqs: int | None = None,
        prefix_caching: bool = True,
        cuda_graphs: str = EngineConfig.cuda_graphs,
        **unknown,
    ):
        super().__init__()
        if unknown:
            known = [name for name in inspect.signature(DSR1LM).parameters if name != "unknown"]
            raise ValueError(f"--model_args {sorted(unknown)} not understood by the dsr1 model; it accepts {known}")
        if dtype not in DTYPES:
            raise ValueError(f"--model_args dtype={dtype!r}; expected one of {list(DTYPES)}")
        if think_cutoff not in THINK_CUTOFFS:
            raise ValueError(f"--model_args think_cutoff={think_cutoff!r}; expected one of {list(THINK_CUTOFFS)}")
        ckpt_path = ckpt_path or tiny_checkpoint()  # built once into the user cache, as scripts/generate.py does
        self.tokenizer = load_tokenizer(ckpt_path)
        self._device = resolve_device(device)
        self._max_gen_toks = int(max_gen_toks)
        self._batch_size = resolve_batch_size(batch_size, max_batch_size)
        self.prefill_chunk = int(prefill_chunk)
        if self.prefill_chunk < 1:
            raise ValueError(f"--model_args prefill_chunk={prefill_chunk}: expected an integer >= 1 (prompt tokens per prefill forward)")
        self.think_end_token = think_end_token or (END_THINK if strip_thinking else None)
        self.think_cutoff = think_cutoff
        parallel = ParallelConfig(int(ep), expert_placement, all2all)
        # Under torchrun (ep > 1) every rank runs this, then the same requests in lockstep.
        self.model, self.group = load_ep_model(
            ckpt_path, parallel, device=self._device, dtype=DTYPES[dtype], fp8=fp8, attn_impl=attn_impl,
            max_seq_len=int(max_length) if max_length else None, progress=is_rank0(),
        )
        self._max_length = self.model.max_seq_len  # default: the checkpoint's max_position_embeddings
        self.engine_config = EngineConfig(  # raises now, naming the field, on a bad value
            block_size=int(block_size), num_blocks=num_blocks and int(num_blocks), max_num_seqs=int(max_num_seqs or self.batch_size),
            max_num_batched_tokens=self.prefill_chunk, enable_prefix_caching=bool(prefix_caching), max_model_len=self._max_length,
            cuda_graphs=cuda_graphs,
        )

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
        """Every request in one serving engine (a fresh one per call, freed after it), each with its own
        gen_kwargs; the texts come back in request order."""
        args = [r.args for r in requests]
        encoded = {context: self.tok_encode(context) for context, _ in args}
        prompts, params, untils = [], [], []
        for context, gen_kwargs in args:
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            ignored = sorted(set(kwargs) - set(GEN_KWARGS))
            if ignored:
                warning_once(log, f"dsr1 ignores gen_kwargs {ignored}; it understands {list(GEN_KWARGS)}")
            max_new = kwargs["max_gen_toks"]
            prompts.append(self._fit(encoded[context], max_new))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs["do_sample"] else 0.0
            untils.append([s for s in handle_stop_sequences(kwargs["until"], eos=EOS) if s])
            params.append(SamplingParams(
                max_tokens=max_new, temperature=temperature, top_p=float(kwargs.get("top_p", 1.0)), stop=untils[-1],
                stop_token_ids=(self.eot_token_id,), stop_only_after=self.think_end_token,
            ))
        engine = Engine(self.model, self.tokenizer, config=self.engine_config, group=self.group)
        pbar = tqdm(total=len(args), desc="dsr1 generate_until", disable=disable_tqdm or not is_rank0())
        outputs = run_requests(engine, prompts, params, lambda: pbar.update(1))
        pbar.close()
        results = []
        for (context, gen_kwargs), until, ids in zip(args, untils, outputs):
            text = answer(self.tok_decode(ids), until, self.think_end_token, self.think_cutoff)
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results

    def _fit(self, ids: list[int], max_new: int) -> list[int]:
        """Drop the oldest context tokens (never the BOS) so context + max_new fits max_length."""
        if max_new >= self.max_length:
            raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt within max_length={self.max_length}; raise --model_args max_length")
        room = self.max_length - max_new
        if len(ids) <= room:
            return ids
        log.warning("context of %d tokens + max_gen_toks=%d exceeds max_length=%d; keeping BOS + the last %d context tokens", len(ids), max_new, self.max_length, room - 1)
        return ids[:1] + ids[len(ids) - room + 1 :]


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
