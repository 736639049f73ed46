"""The image sets that distribution metrics compare: a sampling job's output, an image folder, or any ``data.source``.

``open_image_set(spec, image_size, ...)``:

- a sampling job's folder (``job.json`` beside ``manifest.jsonl``; PNG or WebDataset layout, ``ldm_jax.sample``):
  its images as written, with their prompts;
- ``folder:DIR``, ``webdataset:PATTERN``, ``tfds:NAME[:split]``, ``arrayrecord:DIR`` (``data.source``'s forms) or a
  plain folder of images: decoded as training decodes them (EXIF, any mode to RGB), the shorter side resized to
  ``image_size`` (Lanczos) and centre-cropped, captions where the source has them.

Every set is random access (``item(i)``: the uint8 image [H, W, 3] and its prompt or None), so each process of a
sharded job reads only the rows its own devices score. A record that cannot be read (a corrupt file) has the image
None: the metrics leave it out and count it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

from ldm_jax import storage
from ldm_jax.data import preprocess, sources


class JobImages:
    """A sampling job's images, in index order, with the manifest's prompts."""

    def __init__(self, folder: str):
        manifest = storage.join(folder, "manifest.jsonl")
        if not storage.isfile(manifest):
            raise ValueError(f"{folder!r}: a sampling job folder without manifest.jsonl; run ldm_jax.sample to the end")
        job = json.loads(storage.read_text(storage.join(folder, "job.json")))
        self.entries = [json.loads(line) for line in storage.read_text(manifest).splitlines() if line.strip()]
        if not self.entries:
            raise ValueError(f"{folder!r}: the sampling job's manifest lists no image")
        self.folder, self.format = folder, job["output_format"]
        self._members: dict[str, dict[str, tuple[int, int]]] = {}
        self.description = f"sampling job {folder} ({len(self.entries)} images)"
        self.identity = dict(kind="job", folder=storage.absolute(folder), job=job, count=len(self.entries))

    def __len__(self) -> int:
        return len(self.entries)

    def _offsets(self, shard: str) -> dict[str, tuple[int, int]]:
        if shard not in self._members:
            with storage.open_read(storage.join(self.folder, shard)) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                self._members[shard] = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
        return self._members[shard]

    def encoded(self, i: int) -> bytes:
        e = self.entries[i]
        if self.format == "png":
            return storage.read_bytes(storage.join(self.folder, e["file"]))
        offset, size = self._offsets(e["shard"])[e["key"] + ".png"]
        with storage.open_read(storage.join(self.folder, e["shard"])) as f:
            f.seek(offset)
            return f.read(size)

    def item(self, i: int) -> tuple[np.ndarray | None, str | None]:
        prompt = self.entries[i].get("prompt")
        try:
            with Image.open(io.BytesIO(self.encoded(i))) as im:
                return np.asarray(im.convert("RGB")), prompt
        except (OSError, KeyError):
            return None, prompt


class SourceImages:
    """A ``data.source`` (or a plain folder), centre-cropped to ``image_size``."""

    def __init__(self, spec: str, image_size: int, data_dir: str = "", image_key: str = "image", caption_key: str = ""):
        if image_size < 1:
            raise ValueError(f"{spec!r}: an image size is needed to crop a source's images to (got {image_size})")
        raw = sources.open_source(spec, data_dir, image_key, caption_key)
        self.examples = preprocess.ExampleSource(raw, image_size, "center", False, 0)
        self.description = f"{raw.description} at {image_size}px"
        self.identity = dict(kind="source", spec=spec, data_dir=data_dir, image_key=image_key, image_size=image_size,
                             count=len(raw), listing=_listing_digest(spec))  # fmt: skip

    def __len__(self) -> int:
        return len(self.examples)

    def item(self, i: int) -> tuple[np.ndarray | None, str | None]:
        example = self.examples.record_example(i)[0]
        if example is None:
            return None, None
        return example["image"], (example["captions"][0] if example["captions"] else None)


def _listing_digest(spec: str) -> str:
    """Names, sizes and modification times of a source's files: a cached reference of a folder or shards that
    changed is not reused."""
    kind, rest = sources.parse(spec)
    if kind == "folder":
        paths = sorted(os.path.join(d, n) for d, _, names in os.walk(rest) for n in names)
    elif kind == "webdataset":
        paths = sources.shard_paths(spec, rest)
    elif kind == "arrayrecord":
        paths = sorted(os.path.join(rest, n) for n in os.listdir(rest))
    else:
        return ""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def is_job_folder(path: str) -> bool:
    return storage.isfile(storage.join(path, "job.json"))


def names_job(spec: str) -> bool:
    """Whether ``spec`` is a sampling job's folder, local or in a bucket (not a ``kind:`` data source)."""
    return spec.split(":", 1)[0] not in sources.KINDS and storage.isdir(spec) and is_job_folder(spec)


def open_image_set(spec: str, image_size: int = 0, data_dir: str = "", image_key: str = "image", caption_key: str = ""):
    """The image set ``spec`` names (see the module docstring). Raises ValueError naming ``spec`` when it names
    nothing readable."""
    if names_job(spec):
        return JobImages(spec)
    if spec.split(":", 1)[0] not in sources.KINDS and not storage.is_url(spec) and os.path.isdir(spec):
        spec = f"folder:{spec}"
    elif ":" not in spec or spec.split(":", 1)[0] not in sources.KINDS:
        raise ValueError(
            f"{spec!r}: not a sampling job folder, an image folder or a data source (folder:, webdataset:, tfds:, "
            "arrayrecord:)"
        )
    return SourceImages(spec, image_size, data_dir, image_key, caption_key)


def job_image_size(images) -> int:
    """The side of a sampling job's images (they are square and all alike); 0 for other sets."""
    if not isinstance(images, JobImages):
        return 0
    first = images.item(0)[0]
    return 0 if first is None else int(first.shape[0])
