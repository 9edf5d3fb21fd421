"""What every script under scripts/bench/ reports the same way: a printed table, and with `--json PATH` a
JSON file of its results that carries the command, card and date it was measured with."""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
from pathlib import Path

import torch


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def meta(device: torch.device | str) -> dict:
    """The command line, card, date and versions a result was measured with."""
    return {"command": shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "device": device_name(device),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version()}


def write_json(path: str | Path | None, result: dict) -> dict:
    """Write `result` to `path` (parents created) if a path is given; returns `result`."""
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str))
    return result


def table(rows: list[tuple]) -> str:
    """rows[0] is the header; the first column is left-aligned, the others right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))) for row in cells)
