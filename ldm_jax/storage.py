"""Where a run's files live: a local folder, or a Google Cloud Storage URL (``gs://bucket/path``).

Pod teams keep checkpoints, logs and samples in buckets. Checkpoints go through Orbax, whose arrays tensorstore
writes to ``gs://`` natively; every other file of a run (config.json, metrics.jsonl, TensorBoard events, previews,
evaluation results, sampled images) goes through this module, which uses ``etils.epath`` (gcsfs underneath) for
URLs and plain ``os`` calls for local paths.

Writes are whole-file and atomic on both: a local file is written under a temporary name and renamed; a GCS object
appears only when its upload completes. GCS has no append, so an :class:`AppendLog` on a URL keeps the file's text
and uploads all of it on each flush (metrics and order logs are small; the upload is one request).

Offline testing: ``STORAGE_EMULATOR_HOST`` (gcsfs, google-cloud-storage) and ``TENSORSTORE_GCS_HTTP_URL`` +
``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (tensorstore) point every client at an emulator on 127.0.0.1
(``tests/test_cloud_storage.py``).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from typing import Iterable

# Cloud schemes the stack writes to; other URLs are refused by name rather than written as local folders called
# "s3:" (``os.path.abspath("s3://b/x")`` is a valid local path).
SCHEMES = ("gs://",)
# The process's umask, read once at import (reading it means setting it): the mode a file written in place would
# get, which atomic writes give their temporary file (mkstemp makes it 0600, unreadable by the rest of a team).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def is_url(path: str) -> bool:
    return "://" in str(path)


def check(path: str, field: str) -> None:
    """Raises ``ValueError`` for a URL whose scheme the stack cannot write to, naming ``field``."""
    if is_url(path) and not str(path).startswith(SCHEMES):
        raise ValueError(f"{field}={path!r}: unsupported storage URL; use a local path or one of {SCHEMES}")


def _epath(path: str):
    from etils import epath

    try:
        import gcsfs  # noqa: F401  (epath's gs:// backend without TensorFlow)
    except ImportError as e:
        raise ValueError(f"{path!r}: gs:// paths need gcsfs: pip install -e '.[gcs]'") from e
    _configure_gcsfs()
    return epath.Path(path)


_configured = False


def _configure_gcsfs() -> None:
    """No directory-listing cache: Orbax's arrays are written by tensorstore, not through gcsfs, so a cached
    listing would hide a checkpoint another client (or another process) just wrote."""
    global _configured
    if not _configured:
        import fsspec.config

        for protocol in ("gs", "gcs"):
            fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False
        _configured = True


def absolute(path: str) -> str:
    """A local path made absolute; a URL unchanged (with no trailing slash)."""
    return str(path).rstrip("/") if is_url(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(str(base), *parts) if is_url(base) else os.path.join(base, *parts)


def dirname(path: str) -> str:
    return posixpath.dirname(str(path).rstrip("/")) if is_url(path) else os.path.dirname(os.path.abspath(path))


def exists(path: str) -> bool:
    return _epath(path).exists() if is_url(path) else os.path.exists(path)


def first_free(paths: Iterable[str]) -> str:
    """The first of ``paths`` (e.g. numbered names, ``itertools.count`` long) that does not exist: where a record is
    kept without overwriting an earlier one."""
    return next(p for p in paths if not exists(p))


def isdir(path: str) -> bool:
    return _epath(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    if is_url(path):
        p = _epath(path)
        return p.exists() and not p.is_dir()
    return os.path.isfile(path)


def listdir(path: str) -> list[str]:
    """Names in the folder ``path``, sorted; [] when it does not exist."""
    if is_url(path):
        p = _epath(path)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def makedirs(path: str) -> None:
    """A local folder and its parents; nothing for a URL (GCS has no folders: an object's name makes its path)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def rename(src: str, dst: str) -> None:
    """Moves a file or a whole folder (on GCS: copied object by object, then deleted; not atomic there)."""
    if is_url(src):
        _epath(src).rename(dst)
    else:
        os.replace(src, dst)


def remove(path: str) -> None:
    if is_url(path):
        _epath(path).unlink(missing_ok=True)
    elif os.path.exists(path):
        os.unlink(path)


def rmtree(path: str) -> None:
    """Removes a folder and everything in it; nothing when it does not exist."""
    if is_url(path):
        p = _epath(path)
        if p.exists():
            p.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def replace_folder(tmp: str, out: str, last: tuple[str, ...] = ()) -> None:
    """Puts the finished folder ``tmp`` at ``out``, replacing what was there (both local, or both URLs). Locally
    one rename. In a bucket, which has no folder rename, the files are copied one by one, those named in ``last``
    ('/'-separated relative paths) after all others and in that order, so that a reader who checks for them sees
    a complete folder; then ``tmp`` is removed."""
    if exists(out):
        rmtree(out)
    if not is_url(tmp):
        rename(tmp, out)
        return
    files, folders = [], [""]
    while folders:  # no recursive glob on GCS: one listing per folder
        rel_folder = folders.pop()
        for p in _epath(join(tmp, *filter(None, rel_folder.split("/")))).iterdir():
            rel = f"{rel_folder}/{p.name}".lstrip("/")
            (folders if p.is_dir() else files).append(rel)
    for rel in _last_named_last(files, last):
        _epath(join(tmp, *rel.split("/"))).copy(_epath(join(out, *rel.split("/"))), overwrite=True)
    rmtree(tmp)


def _last_named_last(files: list[str], last: tuple[str, ...]) -> list[str]:
    """``files`` in name order, except those in ``last``, which come after all others and in ``last``'s order."""
    return sorted(files, key=lambda r: (last.index(r) if r in last else -1, r))


def upload_tree(local: str, url: str, last: tuple[str, ...] = ()) -> None:
    """Copies the local folder ``local`` to ``url`` file by file; the files named in ``last`` ('/'-separated
    relative paths) go up after all others, in that order, so that a reader who checks for them sees a complete
    folder (GCS has no atomic rename of a folder)."""
    files = []
    for folder, _, names in os.walk(local):
        files += [os.path.relpath(os.path.join(folder, n), local).replace(os.sep, "/") for n in names]
    for rel in _last_named_last(files, last):
        with open(os.path.join(local, rel), "rb") as f:
            write_bytes(join(url, *rel.split("/")), f.read())


def read_bytes(path: str) -> bytes:
    if is_url(path):
        return _epath(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``path`` whole or not at all: a crash leaves the old file or none, never a truncated one."""
    if is_url(path):
        _epath(path).write_bytes(data)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def open_read(path: str):
    """A binary file object for reading (seekable on both: tarfile reads shard headers without the data)."""
    return _epath(path).open("rb") if is_url(path) else open(path, "rb")


class AppendLog:
    """A text file that grows by lines (metrics.jsonl, data-order logs, manifest parts); a rerun appends.

    Local: an append-mode file, flushed after every write (and fsynced with ``sync``); a last line cut short by a
    kill is removed on opening, so appends never merge into it. URL: the existing object's text is read once, and
    the whole text is uploaded again on each :meth:`write` (GCS objects cannot be appended to, and are never
    partial)."""

    def __init__(self, path: str, sync: bool = False):
        self.path = path
        self._url = is_url(path)
        self._sync = sync
        if self._url:
            self._text = read_text(path) if exists(path) else ""
            self._file = None
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            with open(path, "rb+") as f:
                data = f.read()
                end = data.rfind(b"\n") + 1
                if end != len(data):
                    f.truncate(end)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, lines: Iterable[str] | str) -> None:
        text = "".join([lines] if isinstance(lines, str) else lines)
        if not text:
            return
        if self._url:
            self._text += text
            write_text(self.path, self._text)
            return
        self._file.write(text)
        self._file.flush()
        if self._sync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
