"""scripts/serve.py: every bad flag is one line `serve.py: error: ...` with exit 2 before any weights load;
with no arguments it serves the embedded tiny model, which answers over HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dsr1.serve.cli import main

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "serve.py"

CASES = {
    "port": (["--port", "70000"], ["--port", "[0, 65535]", "'70000'"]),
    "block-size": (["--block-size", "0"], ["--block-size", "integer >= 1"]),
    "num-blocks": (["--num-blocks", "1"], ["--num-blocks", "integer >= 2"]),
    "max-concurrent": (["--max-concurrent", "0"], ["--max-concurrent", "integer >= 1"]),
    "log-interval": (["--log-interval", "-1"], ["--log-interval", ">= 0"]),
    "attn-naive": (["--attn-impl", "naive"], ["--attn-impl naive", "absorb"]),
    "ep-without-torchrun": (["--ep", "2"], ["--ep 2", "WORLD_SIZE=1", "torchrun --nproc-per-node 2"]),
    "ckpt-missing": (["--ckpt-path", "/nonexistent/ckpt", "--port", "0"], ["--ckpt-path /nonexistent/ckpt", "does not exist"]),
}


@pytest.mark.parametrize("argv,words", CASES.values(), ids=CASES.keys())
def test_bad_flag(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("serve.py: error: ") and err.count("\n") == 1
    for word in words:
        assert word in err


def test_port_in_use(capsys):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            main(["--port", str(port)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--port {port}: cannot listen there" in err


@pytest.mark.slow  # a fresh interpreter loading the embedded model
def test_serves_the_embedded_model():
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
                    assert json.loads(r.read()) == {"status": "ok"}
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.1)
        body = json.dumps({"prompt": [0, 5, 6], "max_tokens": 3, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as r:
            out = json.loads(r.read())
        assert out["model"] == "dsr1" and out["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
