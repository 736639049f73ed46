"""A >1 GiB preparation: wall time, images/s, GiB in and out and peak RSS per worker of ``python -m
ldm_jax.prepare_data`` (TFDS without TensorFlow failed on splits over ~1000 MiB; prepare_data writes ArrayRecord
itself, and this measures that nothing in it grows with the dataset).

  PYTHONPATH=. python benchmarks/prepare_large.py [--gib=1.2] [--workers=2,1] [--image_size=512] [--dedupe]
      [--workdir=/tmp/x] [--keep]

Generates, offline, img2dataset-style WebDataset tar shards (``key.jpg`` + ``key.txt`` + ``key.json``) of distinct
JPEGs (quality 95, 720 to 1280 pixels a side): random crops of scikit-image's bundled photos, rescaled, flipped,
re-toned and with pixel noise, so that no two files are equal, until the shards hold ``--gib`` GiB. Then, for each
worker count N of ``--workers``, runs N ``prepare_data`` workers at once (``--process_index=i --process_count=N``),
each under ``/usr/bin/time -v`` for its peak RSS (else ``getrusage``, the largest of them), into a fresh output
folder, and checks the outputs of every worker count are the same bytes. Prints one JSON line per worker count and
a summary. The workdir is a new folder under /tmp unless ``--workdir``; it is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from absl import app, flags

_GIB = flags.DEFINE_float("gib", 1.2, "Size of the generated tar shards, in GiB (2**30 bytes).")
_PER_TAR = flags.DEFINE_integer("images_per_tar", 256, "Images per generated tar shard.")
_WORKERS = flags.DEFINE_list("workers", ["2", "1"], "prepare_data worker counts to time, each run at once.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 512, "prepare_data --image_size.")
_PER_SHARD = flags.DEFINE_integer("records_per_shard", 500, "prepare_data --records_per_shard.")
_DEDUPE = flags.DEFINE_bool("dedupe", False, "Pass --dedupe to prepare_data.")
_GEN_PROCS = flags.DEFINE_integer("gen_procs", 2, "Processes that generate the images.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where the data is written (default: a new folder under /tmp).")
_KEEP = flags.DEFINE_bool("keep", False, "Keep the workdir.")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
           "camera", "grass", "gravel", "brick", "moon")  # fmt: skip
_SIZES = ((1024, 768), (768, 1024), (1024, 1024), (1280, 720), (960, 720), (800, 1200))  # (width, height)
_bases = {}


def _base(name: str):
    import numpy as np
    import skimage.data

    if name not in _bases:
        a = np.asarray(getattr(skimage.data, name)())
        _bases[name] = np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a[..., :3]
    return _bases[name]


def _image(n: int) -> bytes:
    """JPEG of distinct image ``n``: a random crop of a bundled photo, rescaled to about 1024x768, flipped, toned
    and noised (the noise alone makes every file distinct)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(n)
    base = _base(_PHOTOS[n % len(_PHOTOS)])
    h, w = base.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    width, height = _SIZES[rng.integers(len(_SIZES))]
    im = Image.fromarray(base[top : top + ch, left : left + cw]).resize((width, height), Image.Resampling.BILINEAR)
    a = np.asarray(im, np.int16)
    if rng.random() < 0.5:
        a = a[:, ::-1]
    a = a * rng.uniform(0.8, 1.2, 3).astype(np.float32) + rng.integers(-20, 21)
    a = a + rng.integers(-6, 7, a.shape, dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def _write_tar(path: str, shard: int, count: int) -> tuple[int, int]:
    """Tar shard ``shard`` of ``count`` samples; returns (its bytes, its images)."""
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(count):
            n, key = shard * count + i, f"{shard:05d}{i:04d}"
            jpeg = _image(n)
            caption = f"photo {n}: a crop of {_PHOTOS[n % len(_PHOTOS)].replace('_', ' ')}"
            _add(tar, f"{key}.jpg", jpeg)
            _add(tar, f"{key}.txt", caption.encode())
            _add(tar, f"{key}.json", json.dumps({"key": key, "caption": caption, "status": "success"}).encode())
    os.replace(tmp, path)
    return os.path.getsize(path), count


def generate(folder: str, gib: float, per_tar: int, procs: int) -> tuple[int, int, int]:
    """Writes tar shards until they hold ``gib`` GiB; returns (shards, images, bytes)."""
    os.makedirs(folder, exist_ok=True)
    target, total, images, shard, finished = gib * 2**30, 0, 0, 0, 0
    with concurrent.futures.ProcessPoolExecutor(procs) as pool:
        pending = set()
        while True:
            # Shards in flight are counted at the mean size of the finished ones (a guess before the first).
            per = total / finished if finished else 0.4e6 * per_tar
            while len(pending) < procs and total + len(pending) * per < target:
                pending.add(pool.submit(_write_tar, os.path.join(folder, f"{shard:05d}.tar"), shard, per_tar))
                shard += 1
            if not pending:
                break
            done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                size, count = f.result()
                total, images, finished = total + size, images + count, finished + 1
    return shard, images, total


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(folder) for n in names)


def _digest(folder: str) -> str:
    """One hash of every file (relative path and bytes) of the folder."""
    h = hashlib.sha256()
    for d, dirs, names in sorted(os.walk(folder)):
        dirs.sort()
        for n in sorted(names):
            path = os.path.join(d, n)
            h.update(os.path.relpath(path, folder).encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
    return h.hexdigest()


def run_workers(spec: str, out: str, n: int, extra: list[str], log_dir: str) -> dict:
    """N prepare_data workers at once; their wall time and peak RSS."""
    timer = ["/usr/bin/time", "-v"] if os.access("/usr/bin/time", os.X_OK) else []
    env = dict(os.environ, PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs, logs = [], []
    t0 = time.perf_counter()
    for i in range(n):
        argv = [*timer, sys.executable, "-m", "ldm_jax.prepare_data", f"--source={spec}", f"--out={out}",
                f"--process_index={i}", f"--process_count={n}", *extra]  # fmt: skip
        logs.append(os.path.join(log_dir, f"workers{n}-{i}.log"))
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(argv, cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    walls = [None] * n
    while None in walls:  # each worker's own wall time (workers with more shards finish later)
        time.sleep(0.2)
        for k, p in enumerate(procs):
            if walls[k] is None and p.poll() is not None:
                walls[k] = round(time.perf_counter() - t0, 1)
    for p, log in zip(procs, logs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"prepare_data worker failed ({p.returncode}):\n{open(log).read()[-3000:]}")
    wall = max(walls)
    if timer:
        rss, cpu = [], []
        for log in logs:
            text = open(log).read()
            rss.append(int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 2**20)
            cpu.append(
                sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", text).group(1)) for k in ("User", "System"))
            )
    else:  # ru_maxrss (KiB on Linux) is the largest of the children waited for so far
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        rss, cpu = [usage.ru_maxrss / 2**20] * n, [(usage.ru_utime + usage.ru_stime) / n] * n
    # CPU seconds as well as wall time: on a shared machine the wall time depends on the other jobs.
    return {"wall_s": wall, "worker_wall_s": walls, "peak_rss_gib": [round(r, 3) for r in rss], "cpu_s": cpu}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="ldm_jax_prepare_large_", dir="/tmp")
    os.makedirs(workdir, exist_ok=True)
    try:
        tars = os.path.join(workdir, "wds")
        t0 = time.perf_counter()
        n_tars, images, in_bytes = generate(tars, _GIB.value, _PER_TAR.value, _GEN_PROCS.value)
        gen_s = time.perf_counter() - t0
        print(f"generated {images} images in {n_tars} tar shards, {in_bytes / 2**30:.3f} GiB, in {gen_s:.0f} s "
              f"({workdir})", flush=True)  # fmt: skip
        spec = f"webdataset:{tars}/{{00000..{n_tars - 1:05d}}}.tar"
        extra = [f"--image_size={_IMAGE_SIZE.value}", f"--records_per_shard={_PER_SHARD.value}"]
        if _DEDUPE.value:
            extra.append("--dedupe")
        rows, digests = [], {}
        for n in [int(w) for w in _WORKERS.value]:
            out = os.path.join(workdir, f"prepared-{n}")
            shutil.rmtree(out, ignore_errors=True)
            timing = run_workers(spec, out, n, extra, workdir)
            with open(os.path.join(out, "dataset_info.json")) as f:
                info = json.load(f)
            digests[n] = _digest(out)
            row = {
                "bench": "prepare_large",
                "workers": n,
                "images": info["source_records"],
                "records": info["records"],
                "dropped": sum(info["dropped"].values()),
                "input_gib": round(in_bytes / 2**30, 3),
                "output_gib": round(_folder_bytes(out) / 2**30, 3),
                "output_shards": info["shards"],
                "wall_s": round(timing["wall_s"], 1),
                "worker_wall_s": timing["worker_wall_s"],
                "images_per_s": round(info["source_records"] / timing["wall_s"], 1),
                "peak_rss_gib": timing["peak_rss_gib"],
                "worker_cpu_s": [round(c, 1) for c in timing["cpu_s"]],
                "cpu_s_per_image": round(sum(timing["cpu_s"]) / info["source_records"], 4),
                "image_size": _IMAGE_SIZE.value,
                "dedupe": _DEDUPE.value,
                "cpus": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        same = len(set(digests.values())) <= 1
        print(
            json.dumps(
                {"bench": "prepare_large", "generate_s": round(gen_s, 1), "same_output_for_every_worker_count": same}
            )
        )
        print(f"\nprepare_data of {images} JPEGs ({in_bytes / 2**30:.2f} GiB of webdataset tars) at --image_size="
              f"{_IMAGE_SIZE.value}{' --dedupe' if _DEDUPE.value else ''}, {os.cpu_count()} CPUs:")  # fmt: skip
        for r in rows:
            print(f"  {r['workers']} worker(s): {r['wall_s']:.0f} s, {r['images_per_s']:.1f} images/s, "
                  f"{r['output_gib']:.2f} GiB out in {r['output_shards']} shards, peak RSS per worker "
                  f"{', '.join(f'{g:.2f}' for g in r['peak_rss_gib'])} GiB, {r['cpu_s_per_image'] * 1e3:.0f} CPU-ms per image")  # fmt: skip
        print(f"  outputs identical across worker counts: {same}")
        if not same:
            raise SystemExit("the outputs differ between worker counts")
    finally:
        if not _KEEP.value:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
