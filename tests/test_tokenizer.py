"""Tokenizer loading, special-token ids and the R1 chat format."""

import json
import shutil
from pathlib import Path

import pytest

from dsr1.tokenizer import (
    ASSISTANT,
    BOS,
    END_THINK,
    EOS,
    THINK,
    TOKENIZER_FILES,
    USER,
    apply_chat_template,
    copy_tokenizer_files,
    decode,
    encode_messages,
    encode_prompt,
    load_tokenizer,
    packaged_tokenizer_dir,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEXT = "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_special_token_ids(tok):
    ids = tok.convert_tokens_to_ids([BOS, EOS, THINK, END_THINK, USER, ASSISTANT])
    assert ids == [0, 1, 128798, 128799, 128803, 128804]
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)


def test_single_turn_prompt():
    prompt = apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\n"


def test_multi_turn_strips_reasoning_from_history():
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\n2 plus 2 is 4.\n</think>\n\nThe answer is 4."},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert apply_chat_template(messages) == (
        f"{BOS}{USER}What is 2+2?{ASSISTANT}\n\nThe answer is 4.{EOS}"
        f"{USER}And 3+3?{ASSISTANT}{THINK}\n"
    )
    assert apply_chat_template(messages[:2], add_generation_prompt=False) == (
        f"{BOS}{USER}What is 2+2?{ASSISTANT}\n\nThe answer is 4.{EOS}"
    )


def test_system_prompts_joined_without_role_tag():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": "Answer in English."},
    ]
    assert apply_chat_template(messages) == (
        f"{BOS}You are terse.\n\nAnswer in English.{USER}Hi{ASSISTANT}{THINK}\n"
    )


@pytest.mark.parametrize(
    "message, match",
    [
        ({"role": "tool", "content": "42"}, r"message 1 has role='tool'"),
        ({"role": "user"}, r"message 1 \(role='user'\) has content=None"),
    ],
)
def test_bad_message_rejected(message, match):
    with pytest.raises(ValueError, match=match):
        apply_chat_template([{"role": "user", "content": "Hi"}, message])


@pytest.mark.parametrize("chat", [True, False])
def test_encode_prompt_starts_with_one_bos(tok, chat):
    ids = encode_prompt(tok, "What is 2+2?", chat=chat)
    assert ids[0] == 0 and ids[1] != 0
    assert ids.count(0) == 1


def test_encode_prompt_chat_ids(tok):
    ids = encode_prompt(tok, "What is 2+2?")
    assert ids[:2] == [0, 128803]
    assert ids[-3:] == [128804, 128798, tok.convert_tokens_to_ids("Ċ")]  # Ċ: byte-level "\n"
    assert ids == encode_messages(tok, [{"role": "user", "content": "What is 2+2?"}])


def test_decode_round_trip(tok):
    assert decode(tok, encode_prompt(tok, TEXT, chat=False)) == TEXT
    # Only BOS/EOS are special; role and think tags survive decoding.
    assert decode(tok, encode_prompt(tok, TEXT)) == apply_chat_template(
        [{"role": "user", "content": TEXT}]
    ).removeprefix(BOS)


def test_copied_files_load_same_tokenizer(tok, tmp_path):
    copy_tokenizer_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TOKENIZER_FILES)
    assert load_tokenizer(tmp_path).encode(TEXT) == tok.encode(TEXT)


def test_checkpoint_with_model_config(tok, tmp_path):
    copy_tokenizer_files(tmp_path)
    shutil.copyfile(CONFIGS / "tiny.json", tmp_path / "config.json")
    assert encode_prompt(load_tokenizer(tmp_path), TEXT) == encode_prompt(tok, TEXT)


def test_model_config_unknown_to_transformers_falls_back(tok, tmp_path):
    copy_tokenizer_files(tmp_path)
    config = json.loads((CONFIGS / "tiny.json").read_text())
    config["model_type"] = "deepseek_unknown"
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 1, 1)
    assert encode_prompt(loaded, TEXT) == encode_prompt(tok, TEXT)


def test_dir_without_tokenizer_files_uses_packaged(tok, tmp_path):
    shutil.copyfile(CONFIGS / "tiny.json", tmp_path / "config.json")
    assert load_tokenizer(tmp_path) is load_tokenizer(packaged_tokenizer_dir())


def test_missing_tokenizer_json(tmp_path):
    shutil.copyfile(packaged_tokenizer_dir() / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path)
