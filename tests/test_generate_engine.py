"""scripts/generate.py --engine: the serving engine prints what the static batch prints, greedy, for a batch of
prompts (--json) and for one prompt (which the static path streams)."""

from __future__ import annotations

import pytest

from dsr1.generate_cli import main

PROMPTS = ["Hello", "The capital of France is", "1, 2, 3,", "Hello there, how are you today?"]


def output(capsys, *argv: str) -> str:
    main(list(argv))
    return capsys.readouterr().out


@pytest.mark.parametrize("prompts, json", [(PROMPTS, ["--json"]), (PROMPTS[1:2], [])], ids=["batch-json", "one-prompt"])
def test_engine_prints_what_the_static_batch_prints(make_checkpoint, capsys, prompts, json):
    argv = ["--ckpt-path", str(make_checkpoint()), "--device", "cpu", "--dtype", "float32", "--no-chat", "--temperature", "0",
            "--max-new-tokens", "6", "--prefill-chunk", "4", *json, *(a for p in prompts for a in ("--prompt", p))]
    static = output(capsys, *argv)
    assert static.count("\n") == (len(prompts) if json else 1) and len(static) > len(prompts)
    assert output(capsys, *argv, "--engine") == static
