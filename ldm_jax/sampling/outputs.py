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
import tempfile

import numpy as np
from PIL import Image

from ldm_jax import storage
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
    for folder in (outdir, storage.join(outdir, SHARDS)):
        for name in storage.listdir(folder):
            if is_temporary(name):
                storage.remove(storage.join(folder, name))
                n += 1
    return n


def find_done(outdir: str, output_format: str, num_images: int) -> np.ndarray:
    """int64 [num_images]: for each image index, -1 when no complete output holds it; else 0 (png) or the first
    index of the shard that holds it (webdataset). Files of indices past ``num_images`` are not this job's."""
    where = np.full(num_images, -1, np.int64)
    if output_format == "png":
        for name in storage.listdir(outdir):
            m = _PNG.match(name)
            if m and int(m.group(1)) < num_images:
                where[int(m.group(1))] = 0
        return where
    folder = storage.join(outdir, SHARDS)
    for name in storage.listdir(folder):
        m = _SHARD.match(name)
        if not m:
            continue
        with storage.open_read(storage.join(folder, name)) as f, tarfile.open(fileobj=f) as tar:
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
        names = set(storage.listdir(outdir))
        for i in wanted:
            if png_name(i) in names:
                with Image.open(io.BytesIO(storage.read_bytes(storage.join(outdir, png_name(i))))) as im:
                    out[i] = np.asarray(im.convert("RGB"))
        return out
    folder = storage.join(outdir, SHARDS)
    for name in storage.listdir(folder):
        if not _SHARD.match(name):
            continue
        with storage.open_read(storage.join(folder, name)) as f, tarfile.open(fileobj=f) as tar:
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
    """One process's append-only record of the entries it wrote, ``manifest.parts/p<process>.jsonl``, synced after
    each batch. A line cut short by a kill is removed when the part is opened again (``storage.AppendLog``)."""

    def __init__(self, outdir: str, process_index: int):
        self.path = storage.join(outdir, PARTS, f"p{process_index:05d}.jsonl")
        self._log = storage.AppendLog(self.path, sync=True)

    def append(self, entries: list[dict]) -> None:
        self._log.write(json.dumps(e) + "\n" for e in entries)

    def close(self) -> None:
        self._log.close()


class PngWriter:
    """``<index>.png`` files, each written atomically."""

    def __init__(self, outdir: str, process_index: int):
        self.outdir = outdir
        self.part = ManifestPart(outdir, process_index)
        self._pending: list[dict] = []

    def add(self, index: int, image: np.ndarray, entry: dict) -> None:
        save_png(storage.join(self.outdir, png_name(index)), image)
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
        self.folder = storage.join(outdir, SHARDS)
        storage.makedirs(self.folder)
        self.process_index = process_index
        self.shard_size = shard_size
        self.part = ManifestPart(outdir, process_index)
        self._tar = None
        self._open_entries: list[dict] = []  # of the open shard
        self._done_entries: list[dict] = []  # of shards completed since the last commit

    def add(self, index: int, image: np.ndarray, entry: dict) -> None:
        if self._tar is None:
            self._name = shard_name(index)
            tmp_name = f"{self._name}.tmp-p{self.process_index:05d}"
            if storage.is_url(self.folder):  # built in a local temporary file, uploaded whole when complete
                fd, self._tmp = tempfile.mkstemp(prefix=f"{tmp_name}-")
                os.close(fd)
            else:
                self._tmp = os.path.join(self.folder, tmp_name)
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
        final = storage.join(self.folder, self._name)
        if storage.is_url(final):
            with open(self._tmp, "rb") as f:
                storage.write_bytes(final, f.read())
            os.unlink(self._tmp)
        else:
            with open(self._tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(self._tmp, final)
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
    storage.write_text(storage.join(outdir, "manifest.jsonl"), "".join(json.dumps(e) + "\n" for e in entries))


def write_json(path: str, value: dict) -> None:
    storage.write_text(path, json.dumps(value, indent=2) + "\n")
