"""Fixtures: the packaged tokenizer, and a server over the scripted FakeEngine."""

from __future__ import annotations

import pytest

from tests.serve.harness import REPLY, VOCAB, Server
from tests.serve.fake_engine import FakeEngine, scripted_logits
from dsr1.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture
def fake_server(tokenizer):
    server = Server(FakeEngine(tokenizer, scripted_logits(tokenizer, REPLY, VOCAB)))
    yield server
    server.close()
