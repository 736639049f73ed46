"""JSON Lines files of objects (prompts files, image folders' ``metadata.jsonl``): one object per line, blank
lines skipped, a bad line named by file and line number."""

from __future__ import annotations

import json
from collections.abc import Iterable


def parse_objects(lines: Iterable[str], path: str) -> list[dict]:
    """The objects of ``lines`` (a text file's lines) in order. Raises ValueError ``"<path>:<line>: ..."`` for a
    line that is not JSON or not an object."""
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON object ({e.msg})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: a JSON {type(row).__name__}; each line must be an object")
        rows.append(row)
    return rows
