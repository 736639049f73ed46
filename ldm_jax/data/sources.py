"""The user's own data: ``data.source``, one string for every task, opened as a random-access source of raw records.

  folder:/data/pets                     image files in a tree; captions from a sidecar ``name.txt`` (one caption per
                                        line) or a ``metadata.jsonl`` / ``.csv`` / ``.parquet`` at the root with
                                        ``file_name`` and a caption column (Hugging Face ImageFolder's convention);
                                        class labels from the first sub-folder's name (sorted names -> 0, 1, ...)
  webdataset:/data/laion/{00000..01023}.tar   tar shards as img2dataset writes them: ``key.jpg|png|webp`` +
                                        ``key.txt`` caption + optional ``key.json`` (brace ranges, lists and globs)
  tfds:coco_captions[:split]            a prepared TFDS dataset through its ArrayRecord data source (no TensorFlow),
                                        fields named by ``data.image_key`` / ``caption_key`` / ``label_key``
  arrayrecord:/data/prepared            shards written by ``python -m ldm_jax.prepare_data``

Every source is random access (``len``, ``source[i]``), so the training order stays a pure function of (seed, step)
for any number of processes and a resumed run sees exactly the examples an uninterrupted one would. Tar shards are
indexed once when opened (member offsets read from the tar headers, as ``wids`` does), then read by seeking.

A raw record is a dict: ``key`` (str), ``image`` (encoded bytes, or a decoded uint8 array from TFDS), ``captions``
(list of str), ``label`` (int, -1 when none), ``original_size`` (prepared shards: the size before preparation) and
``error`` ("" or why the record itself could not be read, e.g. a
tar member cut short). Decoding, cropping and bad-record accounting are ``data/preprocess.py``'s.
"""

from __future__ import annotations

import concurrent.futures
import csv
import glob
import hashlib
import io
import json
import os
import re
import tarfile
import threading

import numpy as np
from absl import logging

from ldm_jax import json_lines
from ldm_jax.data import records

LATENTS = "latents"  # a latent cache (``data/latent_cache.py``): trains directly, not a source of images
KINDS = ("folder", "webdataset", "tfds", "arrayrecord", LATENTS)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
CAPTION_COLUMNS = ("text", "caption")  # tried in order when data.caption_key is ""


class SourceError(ValueError):
    """A ``data.source`` that cannot be opened: names the source, what is wrong and what is allowed."""


def parse(spec: str) -> tuple[str, str]:
    """``"kind:rest"`` -> (kind, rest), checked."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS or not rest:
        raise SourceError(
            f"data.source={spec!r}: must be KIND:PATH with KIND one of {KINDS}, e.g. 'folder:/data/pets', "
            "'webdataset:/data/laion/{00000..00099}.tar', 'tfds:coco_captions', 'arrayrecord:/data/prepared', "
            "'latents:/data/latent_cache'"
        )
    if "://" in rest and kind != "tfds":
        # The readers open, seek and list local files; a URL would be looked up as a local folder named "gs:".
        raise SourceError(
            f"data.source={spec!r}: a URL; {kind} data is read from a local or mounted path (e.g. the bucket "
            "mounted with gcsfuse, or copied to local disk)"
        )
    return kind, rest


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b`` -> a00b a01b a02b (zero padding kept); ``{x,y}`` -> x y; nested and repeated groups."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def shard_paths(spec: str, pattern: str) -> list[str]:
    """Brace-expanded, then globbed shard paths, in order; every one must exist."""
    out = []
    for p in expand_braces(pattern):
        if any(c in p for c in "*?["):
            found = sorted(glob.glob(p))
            if not found:
                raise SourceError(f"data.source={spec!r}: the pattern {p!r} matches no file")
            out += found
        elif not os.path.isfile(p):
            raise SourceError(f"data.source={spec!r}: no such shard {p!r}")
        else:
            out.append(p)
    if not out:
        raise SourceError(f"data.source={spec!r}: names no shard")
    return out


def _record(key, image=None, captions=(), label=-1, error="", original_size=None) -> dict:
    return {
        "key": key,
        "image": image,
        "captions": list(captions),
        "label": int(label),
        "error": error,
        "original_size": original_size,  # (h, w) before preparation; None: the decoded image's own
    }


def _captions_from_text(raw: bytes) -> tuple[list[str], str]:
    """Non-empty lines of a caption file, or the error reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return [], "caption_not_utf8"
    return [line.strip() for line in text.splitlines() if line.strip()], ""


class FolderSource:
    def __init__(self, spec: str, root: str, caption_key: str = ""):
        if not os.path.isdir(root):
            raise SourceError(f"data.source={spec!r}: no such folder {root!r}")
        files = []
        # Symlinked sub-folders are followed (a class folder is often a link into another dataset, as
        # torchvision's ImageFolder allows); a link back up the tree is entered once, not forever.
        seen = {os.path.realpath(root)}
        for folder, dirs, names in os.walk(root, followlinks=True):
            real = [(d, os.path.realpath(os.path.join(folder, d))) for d in sorted(dirs)]
            dirs[:] = [d for d, r in real if r not in seen]
            seen.update(r for _, r in real)
            files += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise SourceError(f"data.source={spec!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
        self.root, self.files = root, files
        rel = [os.path.relpath(f, root) for f in files]
        subdirs = [r.split(os.sep)[0] for r in rel if os.sep in r]
        # Class labels from the first sub-folder when every image is in one.
        self.class_names = sorted(set(subdirs)) if len(subdirs) == len(rel) else []
        self.labels = [self.class_names.index(r.split(os.sep)[0]) if self.class_names else -1 for r in rel]
        self.metadata = _read_metadata(spec, root, caption_key)
        self.description = f"folder {root} ({len(files)} images)"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        path = self.files[i]
        key = os.path.relpath(path, self.root)
        captions, error = list(self.metadata.get(key.replace(os.sep, "/"), ())), ""
        sidecar = os.path.splitext(path)[0] + ".txt"
        if not captions and os.path.isfile(sidecar):
            with open(sidecar, "rb") as f:
                captions, error = _captions_from_text(f.read())
        try:
            with open(path, "rb") as f:
                image = f.read()
        except OSError:
            return _record(key, None, captions, self.labels[i], "unreadable_file")
        return _record(key, image, captions, self.labels[i], error)


def _read_metadata(spec: str, root: str, caption_key: str) -> dict[str, list[str]]:
    """file_name (relative, '/'-separated) -> captions, from the folder's metadata file if it has one."""
    present = [n for n in METADATA_FILES if os.path.isfile(os.path.join(root, n))]
    if not present:
        return {}
    path = os.path.join(root, present[0])
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            try:
                rows = json_lines.parse_objects(f, path)
            except ValueError as e:
                raise SourceError(f"data.source={spec!r}: {e}") from e
    elif path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise SourceError(f"data.source={spec!r}: reading {path} needs pyarrow (pip install pyarrow)") from e
        rows = pq.read_table(path).to_pylist()
    columns = set(rows[0]) if rows else set()
    wanted = (caption_key,) if caption_key else CAPTION_COLUMNS
    column = next((c for c in wanted if c in columns), None)
    if "file_name" not in columns or column is None:
        raise SourceError(
            f"data.source={spec!r}: {path} needs a 'file_name' column and a caption column "
            f"({' or '.join(wanted)}); it has {sorted(columns)}"
        )
    out: dict[str, list[str]] = {}
    for n, row in enumerate(rows, 1):
        if "file_name" not in row or column not in row:
            raise SourceError(
                f"data.source={spec!r}: {path}: row {n} has no {'file_name' if 'file_name' not in row else column!r} "
                f"(its keys: {sorted(row)}); every row needs 'file_name' and {column!r}"
            )
        value = row[column]
        texts = value if isinstance(value, list) else [value]
        out.setdefault(str(row["file_name"]), []).extend(str(t).strip() for t in texts if t and str(t).strip())
    return out


# Where shard indexes are kept between runs (a shard is indexed again when its size or mtime changes); "off": never.
INDEX_CACHE_ENV = "LDM_JAX_INDEX_CACHE"
# Shards indexed at once: reading tar headers is I/O-bound (a network filesystem's latency per header).
INDEX_THREADS = 16


def index_cache_dir() -> str:
    return os.environ.get(INDEX_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax", "tar_index")


def _cached_index(spec: str, n: int, path: str) -> list:
    """``_index_tar``'s samples of one shard, from the index cache when the shard is unchanged since it was indexed."""
    folder = index_cache_dir()
    if os.environ.get(INDEX_CACHE_ENV) == "off":
        return _index_tar(spec, n, path)
    st = os.stat(path)
    # "v2": indexes of the code that read past a damaged header without a word are not reused.
    key = hashlib.sha1(f"v2|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    cached = os.path.join(folder, f"{key}.json")
    if os.path.isfile(cached):
        try:
            with open(cached) as f:
                rows = json.load(f)
            return [(n, k, {e: tuple(v) for e, v in members.items()}, err) for k, members, err in rows]
        except (OSError, ValueError, TypeError):
            pass  # an unreadable cache entry is rebuilt below
    samples = _index_tar(spec, n, path)
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = f"{cached}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "w") as f:
            json.dump([[k, members, err] for _, k, members, err in samples], f)
        os.replace(tmp, cached)
    except OSError as e:  # the index is still right; only the next run's start-up is slower
        logging.warning("tar index cache %s not written (%s); set %s to a writable folder", folder, e, INDEX_CACHE_ENV)
    return samples


class WebDatasetSource:
    """Tar shards indexed by member offsets: random access without unpacking. The shards are indexed in parallel
    threads, and each shard's index is kept in ``index_cache_dir()`` for the next run."""

    def __init__(self, spec: str, pattern: str):
        self.shards = shard_paths(spec, pattern)
        self.index = []  # (shard number, key, {extension: (offset, size)}, error)
        with concurrent.futures.ThreadPoolExecutor(min(INDEX_THREADS, len(self.shards))) as pool:
            for samples in pool.map(lambda a: _cached_index(spec, *a), enumerate(self.shards)):
                self.index += samples
        if not self.index:
            raise SourceError(f"data.source={spec!r}: {len(self.shards)} shard(s) hold no samples")
        self.description = f"webdataset {len(self.shards)} shard(s), {len(self.index)} samples"

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        n, key, members, error = self.index[i]
        if error:
            return _record(key, error=error)
        with open(self.shards[n], "rb") as f:

            def read(ext):
                offset, size = members[ext]
                f.seek(offset)
                data = f.read(size)
                return data if len(data) == size else None

            image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
            if image_ext is None:
                return _record(key, error="missing_image")
            image = read(image_ext)
            if image is None:
                return _record(key, error="truncated")
            captions, error = [], ""
            if "txt" in members:
                raw = read("txt")
                captions, error = _captions_from_text(raw) if raw is not None else ([], "truncated")
            elif "json" in members:
                raw = read("json")
                try:
                    caption = json.loads(raw).get("caption") if raw else None
                except (ValueError, UnicodeDecodeError):
                    caption = None
                captions = [caption.strip()] if isinstance(caption, str) and caption.strip() else []
        return _record(key, image, captions, -1, error)


def _index_tar(spec: str, n: int, path: str) -> list:
    """Samples of one shard: members grouped by key (the member name up to the first '.' of its file name)."""
    size = os.path.getsize(path)
    samples: dict[str, dict] = {}
    errors: dict[str, str] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                folder, name = os.path.split(info.name)
                stem, _, ext = name.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                samples.setdefault(key, {})[ext.lower()] = (info.offset_data, info.size)
                if info.offset_data + info.size > size:
                    errors[key] = "truncated"
            end = tar.offset  # where iteration stopped: the end-of-archive blocks, or a header it could not read
    except (tarfile.TarError, EOFError, OSError) as e:
        if not samples:
            raise SourceError(f"data.source={spec!r}: {path} is not a readable tar file ({e})") from e
        # A shard cut short: the samples before the cut are kept; the last one is checked by its sizes above.
        end = None
    # tarfile ends iteration without an error at a damaged header past the first: every sample after it would be
    # left out, uncounted. Past the last member a tar file holds only zero blocks.
    damaged = None if end is None else _first_nonzero_byte(path, end)
    if damaged is not None:
        raise SourceError(
            f"data.source={spec!r}: {path} has a damaged tar header at byte {end}: "
            f"the {len(samples)} sample(s) before it are readable, the rest of the shard is not; repair or "
            "re-create the shard, or leave it out of the pattern"
        )
    return [(n, key, members, errors.get(key, "")) for key, members in samples.items()]


def _first_nonzero_byte(path: str, start: int, chunk: int = 1 << 20) -> int | None:
    """The offset of the first byte that is not zero in ``path`` from ``start`` on, or None."""
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        while block := f.read(chunk):
            stripped = block.lstrip(b"\0")
            if stripped:
                return offset + len(block) - len(stripped)
            offset += len(block)
    return None


class TFDSSource:
    def __init__(self, spec: str, rest: str, data_dir: str, image_key: str, caption_key: str, label_key: str):
        import tensorflow_datasets as tfds

        name, _, split = rest.partition(":")
        self.split = split or "train"
        try:
            self.source = tfds.data_source(name, split=self.split, data_dir=data_dir or None, download=False)
        except Exception as e:  # TFDS raises many types for a dataset that is not prepared or does not exist
            raise SourceError(
                f"data.source={spec!r}: TFDS dataset {name!r} split {self.split!r} could not be opened from "
                f"data.data_dir={data_dir!r} ({type(e).__name__}: {e}); prepare it first (nothing is downloaded)"
            ) from e
        features = self.source.dataset_info.features
        keys = set(features.keys())
        for field, key in (("data.image_key", image_key), ("data.caption_key", caption_key)):
            if key and key.split("/")[0] not in keys:
                raise SourceError(f"data.source={spec!r}: {field}={key!r} is not a feature; it has {sorted(keys)}")
        if label_key and label_key not in keys:
            raise SourceError(f"data.source={spec!r}: data.label_key={label_key!r} is not a feature ({sorted(keys)})")
        self.image_key, self.caption_key, self.label_key = image_key, caption_key, label_key
        self.class_names = []
        if label_key:
            # The classes are a ClassLabel's names; a bare integer or text feature names no classes to count.
            names = getattr(features[label_key], "names", None)
            if names is None:
                raise SourceError(
                    f"data.source={spec!r}: data.label_key={label_key!r} is a {type(features[label_key]).__name__} "
                    "feature; class labels must be a tfds.features.ClassLabel (its names are the classes)"
                )
            self.class_names = list(names)
        self.description = f"tfds {name} {self.split} ({len(self.source)} records)"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        ex = self.source[i]
        captions = []
        if self.caption_key:
            value = ex
            for part in self.caption_key.split("/"):  # e.g. "captions/text" in coco_captions
                value = value[part]
            for v in np.atleast_1d(np.asarray(value, dtype=object)):
                text = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                if text.strip():
                    captions.append(text.strip())
        label = int(ex[self.label_key]) if self.label_key else -1
        return _record(str(i), np.asarray(ex[self.image_key]), captions, label)


class ArrayRecordSource:
    """Shards of ``ldm_jax.prepare_data`` (``*.array_record`` files in one folder, in name order)."""

    def __init__(self, spec: str, folder: str):
        import grain.python as grain

        from ldm_jax.data import shards

        paths = sorted(glob.glob(os.path.join(folder, "*.array_record")))
        if not paths:
            raise SourceError(f"data.source={spec!r}: no *.array_record shards in {folder!r}")
        info = os.path.join(folder, records.INFO_FILE)
        self.info = {}
        if os.path.isfile(info):  # prepared by ldm_jax.prepare_data: its shards, not others in the folder
            with open(info) as f:
                self.info = json.load(f)
            paths = shards.listed_paths(folder, self.info, spec)
        elif os.path.isfile(os.path.join(folder, "settings.json")):
            # A preparation still running, or one whose workers did not all finish: a subset of the data, and a
            # record order that changes when the rest lands (no exact resume).
            raise SourceError(
                f"data.source={spec!r}: {folder!r} is a preparation without {records.INFO_FILE}: not every shard "
                "is written yet; run python -m ldm_jax.prepare_data to the end (every worker) first"
            )
        self.class_names = list(self.info.get("class_names", []))
        self.source = grain.ArrayRecordDataSource(paths)
        self.description = f"arrayrecord {folder} ({len(paths)} shards, {len(self.source)} records)"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        return records.decode(self.source[i])


def check_exists(spec: str) -> None:
    """The cheap checks of ``spec`` (its form, and that its paths exist), for config validation before any device
    work; opening it (``open_source``) checks the rest."""
    kind, rest = parse(spec)
    if kind == "folder" and not os.path.isdir(rest):
        raise SourceError(f"data.source={spec!r}: no such folder {rest!r}")
    if kind == "webdataset":
        shard_paths(spec, rest)
    if kind == "arrayrecord" and not glob.glob(os.path.join(rest, "*.array_record")):
        raise SourceError(f"data.source={spec!r}: no *.array_record shards in {rest!r}")
    if kind == LATENTS and not glob.glob(os.path.join(rest, "*.array_record")):
        raise SourceError(f"data.source={spec!r}: no latent-cache shards (*.array_record) in {rest!r}")


def open_source(spec: str, data_dir: str = "", image_key: str = "image", caption_key: str = "", label_key: str = ""):
    """The random-access source ``spec`` names (see the module docstring); errors name the source."""
    kind, rest = parse(spec)
    if kind == "folder":
        return FolderSource(spec, rest, caption_key)
    if kind == "webdataset":
        return WebDatasetSource(spec, rest)
    if kind == "tfds":
        return TFDSSource(spec, rest, data_dir, image_key, caption_key, label_key)
    if kind == LATENTS:
        raise SourceError(
            f"data.source={spec!r}: a latent cache is trained from directly (data.source), it is not a source of "
            "images to prepare or encode; name the images it was made from"
        )
    return ArrayRecordSource(spec, rest)


def decode_to_pil(image):
    """Encoded bytes or a uint8 array -> a PIL image (not yet converted); raises on unreadable data."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        return Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[-1] == 1 else image)
    im = Image.open(io.BytesIO(image))
    im.load()  # decode now: a truncated file fails here, not later
    return im
