"""The docs say what is true now: every result file in docs/perf is cited by a doc and every cited one exists;
no lab-notebook words in the docs a reader outside the team reads."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "evals" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_result_files_are_cited_and_exist():
    text = "\n".join(p.read_text() for p in DOCS)
    cited = {m.rstrip(".,)`") for m in re.findall(r"docs/perf/[\w.-]+", text)}
    kept = {f"docs/perf/{p.name}" for p in (ROOT / "docs" / "perf").iterdir()}
    assert not cited - kept, f"cited but missing: {sorted(cited - kept)}"
    uncited = {k for k in kept if k not in text and k.replace("docs/perf/", "…") not in text}
    assert not uncited, f"in docs/perf but cited by no doc: {sorted(uncited)}"


def test_no_lab_notebook_words():
    for path in DOCS:
        for word in (r"\bsession\b", r"\bthe seed\b", r"\bissue \d+", r"(?<![\w/])#\d+\b(?! \w)"):
            hits = [line for line in path.read_text().splitlines() if re.search(word, line, re.I) and "PR #28449" not in line]
            assert not hits, f"{path.relative_to(ROOT)}: {word}: {hits[:3]}"
