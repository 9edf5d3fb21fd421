"""The embedded default: what `scripts/generate.py` runs without `--ckpt-path`.

It builds the random-weight checkpoint of configs/tiny.json (FP8, seed 0) once into the user cache
directory and answers a built-in prompt, so the whole pipeline (loader, FP8, MLA cache, MoE, tokenizer,
chat format) runs end to end with no download.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import shutil
import tempfile
from pathlib import Path

import dsr1.fp8
import dsr1.checkpoint.hf_names
import dsr1.checkpoint.synthetic
from dsr1.checkpoint.synthetic import write_checkpoint

BUILTIN_PROMPT = "What is the capital of France?"
MAX_NEW_TOKENS = 32
SEED = 0
# The checkpoint's bytes follow from the config and from these modules' code, so both name the cache entry.
WRITER_MODULES = (dsr1.checkpoint.synthetic, dsr1.checkpoint.hf_names, dsr1.fp8)


def tiny_config_path() -> Path:
    """configs/tiny.json of the source tree, else a copy shipped as package data at dsr1/configs/tiny.json."""
    in_repo = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"
    if in_repo.is_file():
        return in_repo
    packaged = importlib.resources.files("dsr1") / "configs" / "tiny.json"
    if packaged.is_file():
        return Path(str(packaged))
    raise FileNotFoundError(
        f"the embedded default needs configs/tiny.json, found neither {in_repo} nor {packaged}; "
        f"run from a dsr1 source checkout or pass --ckpt-path"
    )


def cache_root() -> Path:
    """$XDG_CACHE_HOME/dsr1, or ~/.cache/dsr1."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsr1"


def tiny_checkpoint() -> Path:
    """The tiny checkpoint's directory in the cache, built on first use.

    It is written into a temporary sibling and renamed into place, so an interrupted build is never
    picked up; if another process finished first, its copy wins and ours is discarded.
    """
    config = tiny_config_path()
    digest = hashlib.sha256(config.read_bytes() + f"seed={SEED}".encode())
    for module in WRITER_MODULES:
        digest.update(Path(module.__file__).read_bytes())
    final = cache_root() / f"tiny-{digest.hexdigest()[:12]}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write_checkpoint(config, tmp, seed=SEED, dtype="fp8")
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
