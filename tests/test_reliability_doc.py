"""docs/RELIABILITY.md cites, for each bad checkpoint input, the tests that assert what it gets: each must exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_cited_test_exists():
    doc = (ROOT / "docs" / "RELIABILITY.md").read_text()
    section = doc.split("## A checkpoint directory is untrusted")[1].split("## ")[0]
    cited = set(re.findall(r"`(test_\w+)`", section))
    defined = {m for f in ROOT.glob("tests/**/*.py") for m in re.findall(r"^def (test_\w+)", f.read_text(), re.M)}
    assert len(cited) >= 20 and cited <= defined, sorted(cited - defined)
