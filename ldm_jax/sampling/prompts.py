"""Prompt files of sampling jobs: .txt, .jsonl, .csv and .tsv, each prompt with an id.

- ``.txt``: one prompt per non-empty line, without an id.
- ``.jsonl``: one JSON object per line, the prompt under ``caption_column`` (default: the first of ``caption``,
  ``prompt``, ``text`` present), the id under ``id_column`` (default ``id`` when present).
- ``.csv`` / ``.tsv``: a header row, then one row per prompt, columns as for .jsonl. The MLPerf Stable Diffusion
  file (COCO-2014 val captions, ``captions_source.tsv``) has the columns ``id``, ``image_id``, ``caption``: its
  caption ids are the ids; other columns (``image_id``) travel into each image's manifest entry.

A prompt without an id (a .txt line, a ``--prompt`` flag, a row without an id column) is named by its position in
the job's list of prompts (``job_prompts``). Ids must be unique: a job's manifest names each image by (id, sample
index).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os

from ldm_jax import json_lines, storage

SUFFIXES = (".txt", ".jsonl", ".csv", ".tsv")
CAPTION_COLUMNS = ("caption", "prompt", "text")
ID_COLUMN = "id"


@dataclasses.dataclass(frozen=True)
class Prompt:
    id: str | None  # None: named by its position in the job
    text: str
    extra: dict  # the row's other columns, recorded in the manifest


def _pick(columns, wanted: str, defaults: tuple[str, ...], path: str, what: str) -> str | None:
    if wanted:
        if wanted not in columns:
            raise ValueError(f"{path}: no {what} column {wanted!r} (its columns: {sorted(columns)})")
        return wanted
    return next((c for c in defaults if c in columns), None)


def _rows(path: str, suffix: str) -> list[dict]:
    with io.StringIO(storage.read_text(path), newline="") as f:
        if suffix == ".jsonl":
            return json_lines.parse_objects(f, path)
        reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames:
            raise ValueError(f"{path}: no header row (a {suffix} prompts file starts with its column names)")
        return list(reader)


def read_prompts_file(path: str, caption_column: str = "", id_column: str = "") -> list[Prompt]:
    """The prompts of ``path`` in file order. Raises ValueError naming the file (and line or column) for an unknown
    suffix, a missing column, an empty prompt or a repeated id; FileNotFoundError for a missing file."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"--prompts_file={path!r}: unknown type {suffix!r}; must end in {', '.join(SUFFIXES)}")
    storage.check(path, "--prompts_file")
    if not storage.isfile(path):  # local or gs://
        raise FileNotFoundError(f"--prompts_file={path!r}: no such file")
    if suffix == ".txt":
        # Universal newlines, as open() reads a text file (str.splitlines would also split at \x0c, \u2028, ...).
        texts = [line.strip() for line in io.StringIO(storage.read_text(path), newline=None) if line.strip()]
        prompts = [Prompt(None, t, {}) for t in texts]
    else:
        rows = _rows(path, suffix)
        columns = set().union(*(r.keys() for r in rows)) if rows else set()
        text_key = _pick(columns, caption_column, CAPTION_COLUMNS, path, "caption")
        if rows and text_key is None:
            raise ValueError(
                f"{path}: no caption column (looked for {', '.join(CAPTION_COLUMNS)}; its columns: "
                f"{sorted(columns)}); name it with --caption_column"
            )
        id_key = _pick(columns, id_column, (ID_COLUMN,), path, "id")
        prompts = []
        for i, row in enumerate(rows):
            text = row.get(text_key)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}: prompt {i} ({text_key!r}={text!r}) is empty or not text")
            pid = str(row[id_key]) if id_key is not None and row.get(id_key) not in (None, "") else None
            extra = {k: v for k, v in row.items() if k not in (text_key, id_key)}
            prompts.append(Prompt(pid, text.strip(), extra))
    if not prompts:
        raise ValueError(f"--prompts_file={path!r}: holds no prompt")
    return prompts


def job_prompts(flag_prompts: list[str], path: str = "", caption_column: str = "", id_column: str = "") -> list[Prompt]:
    """The ``--prompt`` flags, then the prompts of ``path``; a prompt without an id gets its position in this list.
    Raises ValueError naming a repeated id."""
    prompts = [Prompt(None, p, {}) for p in flag_prompts]
    if path:
        prompts += read_prompts_file(path, caption_column, id_column)
    elif caption_column or id_column:
        raise ValueError("--caption_column / --id_column name columns of a --prompts_file; none was given")
    prompts = [p if p.id is not None else dataclasses.replace(p, id=str(i)) for i, p in enumerate(prompts)]
    seen: dict[str, int] = {}
    for i, p in enumerate(prompts):
        if p.id in seen:
            raise ValueError(f"prompt {i} has the id {p.id!r} of prompt {seen[p.id]}: ids must be unique")
        seen[p.id] = i
    return prompts
