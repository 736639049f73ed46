"""What a sampling job writes, and how a rerun finds what is done.

Two layouts of one job folder (``--output_format``):

- ``png``: ``<index>.png`` per image (index zero-padded to 5 digits, wider past 99999);
- ``webdataset``: ``shards/<first index>.tar`` tar shards of ``--shard_size`` images, each image as the members
  ``<key>.png``, ``<key>.json`` (its manifest entry) and, for a prompt, ``<key>.txt``; ``<key>`` is its index
  zero-padded to 8 digits: the layout WebDataset and img2dataset readers take, and ``data.source=webdataset:`` too.

The files themselves record what is done: a PNG is renamed into place only once written whole, a shard only once
complete (``<name>.tar.tmp-p<process>`` while being written). So a job killed at any point leaves complete outputs
and temporaries, nothing half-written under a final name; the rerun counts complete outputs as done, removes the
temporaries and makes the rest. Every process also appends the manifest entries of what it wrote to its own
``manifest.parts/p<process>.jsonl`` after each batch (flushed and synced: a live record of the job), and at the end
process 0 writes ``manifest.jsonl``, one entry per image in index order, from the job's plan and the outputs found.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile

import numpy as np
from PIL import Image

from ldm_jax.imaging import save_png

FORMATS = ("png", "webdataset")
SHARDS = "shards"
PARTS = "manifest.parts"
_PNG = re.compile(r"^(\d{5,})\.png$")
_SHARD = re.compile(r"^(\d{8,})\.tar$")
_MEMBER = re.compile(r"^(\d{8,})\.png$")


def png_name(index: int) -> str:
    return f"{index:05d}.png"


def shard_name(first_index: int) -> str:
    return f"{first_index:08d}.tar"


def key_of(index: int) -> str:
    return f"{index:08d}"


def is_temporary(name: str) -> bool:
    """Our temporaries: ``save_png``'s ``*.png.tmp``, unfinished shards and JSON files."""
    return name.endswith(".tmp") or ".tar.tmp-p" in name


def remove_temporaries(outdir: str) -> int:
    """Removes what a killed job left half-written; returns how many."""
    n = 0
    for folder in (outdir, os.path.join(outdir, SHARDS)):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if is_temporary(name):
                    os.unlink(os.path.join(folder, name))
                    n += 1
    return n


def find_done(outdir: str, output_format: str, num_images: int) -> np.ndarray:
    """int64 [num_images]: for each image index, -1 when no complete output holds it; else 0 (png) or the first
    index of the shard that holds it (webdataset). Files of indices past ``num_images`` are not this job's."""
    where = np.full(num_images, -1, np.int64)
    if output_format == "png":
        if os.path.isdir(outdir):
            for name in os.listdir(outdir):
                m = _PNG.match(name)
                if m and int(m.group(1)) < num_images:
                    where[int(m.group(1))] = 0
        return where
    folder = os.path.join(outdir, SHARDS)
    if not os.path.isdir(folder):
        return where
    for name in sorted(os.listdir(folder)):
        m = _SHARD.match(name)
        if not m:
            continue
        with tarfile.open(os.path.join(folder, name)) as tar:
            for member in tar:  # headers only: tarfile seeks past the data of a file on disk
                k = _MEMBER.match(member.name)
                if k and int(k.group(1)) < num_images:
                    where[int(k.group(1))] = int(m.group(1))
    return where


def read_images(outdir: str, output_format: str, indices) -> dict[int, np.ndarray]:
    """uint8 [H, W, 3] images of the given indices, from either layout (those not found are left out)."""
    wanted = set(int(i) for i in indices)
    out = {}
    if output_format == "png":
        for i in wanted:
            path = os.path.join(outdir, png_name(i))
            if os.path.exists(path):
                with Image.open(path) as im:
                    out[i] = np.asarray(im.convert("RGB"))
        return out
    folder = os.path.join(outdir, SHARDS)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not _SHARD.match(name):
            continue
        with tarfile.open(os.path.join(folder, name)) as tar:
            for member in tar:
                k = _MEMBER.match(member.name)
                if k and int(k.group(1)) in wanted:
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                        out[int(k.group(1))] = np.asarray(im.convert("RGB"))
    return out


def _encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class ManifestPart:
    """One process's append-only record of the entries it wrote, ``manifest.parts/p<process>.jsonl``. A line cut
    short by a kill is removed when the part is opened again, so appends never merge into it."""

    def __init__(self, outdir: str, process_index: int):
        folder = os.path.join(outdir, PARTS)
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"p{process_index:05d}.jsonl")
        if os.path.exists(self.path):
            with open(self.path, "rb+") as f:
                data = f.read()
                end = data.rfind(b"\n") + 1
                if end != len(data):
                    f.truncate(end)
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, entries: list[dict]) -> None:
        if not entries:
            return
        self._file.write("".join(json.dumps(e) + "\n" for e in entries))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class PngWriter:
    """``<index>.png`` files, each written atomically."""

    def __init__(self, outdir: str, process_index: int):
        self.outdir = outdir
        self.part = ManifestPart(outdir, process_index)
        self._pending: list[dict] = []

    def add(self, index: int, image: np.ndarray, entry: dict) -> None:
        save_png(os.path.join(self.outdir, png_name(index)), image)
        self._pending.append(dict(entry, file=png_name(index)))

    def commit(self) -> None:
        """End of a batch: its entries go to the manifest part."""
        self.part.append(self._pending)
        self._pending = []

    def close(self) -> None:
        self.commit()
        self.part.close()


class ShardWriter:
    """WebDataset tar shards of up to ``shard_size`` images, each renamed into place only when complete."""

    def __init__(self, outdir: str, process_index: int, shard_size: int):
        self.folder = os.path.join(outdir, SHARDS)
        os.makedirs(self.folder, exist_ok=True)
        self.process_index = process_index
        self.shard_size = shard_size
        self.part = ManifestPart(outdir, process_index)
        self._tar = None
        self._open_entries: list[dict] = []  # of the open shard
        self._done_entries: list[dict] = []  # of shards completed since the last commit

    def add(self, index: int, image: np.ndarray, entry: dict) -> None:
        if self._tar is None:
            self._name = shard_name(index)
            self._tmp = os.path.join(self.folder, f"{self._name}.tmp-p{self.process_index:05d}")
            self._tar = tarfile.open(self._tmp, "w")
        key = key_of(index)
        entry = dict(entry, shard=f"{SHARDS}/{self._name}", key=key)
        members = [("png", _encode_png(image)), ("json", json.dumps(entry).encode())]
        if isinstance(entry.get("prompt"), str):
            members.append(("txt", entry["prompt"].encode()))
        for suffix, data in members:
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._open_entries.append(entry)
        if len(self._open_entries) >= self.shard_size:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._tar.close()
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, os.path.join(self.folder, self._name))
        self._tar = None
        self._done_entries += self._open_entries
        self._open_entries = []

    def commit(self) -> None:
        self.part.append(self._done_entries)
        self._done_entries = []

    def close(self) -> None:
        if self._tar is not None:
            self._finish_shard()
        self.commit()
        self.part.close()


def make_writer(output_format: str, outdir: str, process_index: int, shard_size: int):
    if output_format == "png":
        return PngWriter(outdir, process_index)
    return ShardWriter(outdir, process_index, shard_size)


def write_manifest(outdir: str, entries: list[dict]) -> None:
    """``manifest.jsonl`` (atomically): one JSON entry per line."""
    path = os.path.join(outdir, "manifest.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(e) + "\n" for e in entries))
    os.replace(path + ".tmp", path)


def write_json(path: str, value: dict) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)
