"""Input pipeline throughput per host: JPEG decode + resize + crop (+ flip, tokenization) through the real loader.

  PYTHONPATH=. python benchmarks/input_pipeline.py [--images=512] [--size=512] [--workers=0,1,2] [--batch=32] [--workdir=/tmp/x]

Writes ``--images`` JPEGs of 640x800 to 1024x768 (crops of scikit-image's photos, quality 90) as a folder with
captions, as WebDataset tar shards and as prepared ArrayRecord shards (``ldm_jax.prepare_data`` at ``--size``),
then times one pass of ``pipeline.make_loader`` (one process, a txt2img tokenizer, random crop and flip at
``--size``) over each source for each grain worker count, from the loader's creation (worker start-up included). Prints one JSON line per
(source, workers) with images/s, and a markdown table.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time

from absl import app, flags

_IMAGES = flags.DEFINE_integer("images", 512, "Images in the synthetic dataset.")
_SIZE = flags.DEFINE_integer("size", 512, "Training image size (shorter side resized to it, square crop).")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts to time.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch size.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/ldm_jax_input_bench", "Where the datasets are written.")


def make_datasets(root: str, n: int, size: int) -> dict[str, str]:
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    from ldm_jax.prepare_data import prepare

    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    folder, shards = os.path.join(root, "folder"), os.path.join(root, "wds")
    os.makedirs(folder, exist_ok=True)
    os.makedirs(shards, exist_ok=True)
    rng = np.random.default_rng(0)
    per_shard = max(n // 4, 1)
    tar = None
    for i in range(n):
        w, h = [(1024, 768), (640, 800), (800, 800), (960, 640)][i % 4]
        photo = Image.fromarray(photos[i % len(photos)]).resize((w, h), Image.Resampling.BILINEAR)
        photo = Image.fromarray(np.asarray(photo)[:, :: 1 if rng.random() < 0.5 else -1])
        buf = io.BytesIO()
        photo.save(buf, format="JPEG", quality=90)
        jpeg, caption = buf.getvalue(), f"photo {i} of a scene".encode()
        with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
            f.write(jpeg)
        with open(os.path.join(folder, f"{i:06d}.txt"), "wb") as f:
            f.write(caption)
        if i % per_shard == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(os.path.join(shards, f"{i // per_shard:05d}.tar"), "w")
        for name, payload in ((f"{i:06d}.jpg", jpeg), (f"{i:06d}.txt", caption)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    tar.close()
    prepared = os.path.join(root, "prepared")
    settings = dict(image_size=size, records_per_shard=max(n // 4, 1), min_side=0, max_aspect=0.0,
                    require_caption=True)  # fmt: skip
    t0 = time.perf_counter()
    prepare(f"folder:{folder}", prepared, settings)
    print(json.dumps({"prepare_data_s": round(time.perf_counter() - t0, 2), "images": n}))
    last = len(os.listdir(shards)) - 1
    return {
        "folder": f"folder:{folder}",
        "webdataset": f"webdataset:{shards}/{{00000..{last:05d}}}.tar",
        "arrayrecord": f"arrayrecord:{prepared}",
    }


def main(argv):
    del argv
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from configs import txt2img
    from ldm_jax.data import pipeline
    from ldm_jax.data.tokenizer import CLIPTokenizer

    specs = make_datasets(_WORKDIR.value, _IMAGES.value, _SIZE.value)
    tokenizer = CLIPTokenizer(77, "eot")
    rows = []
    for name, spec in specs.items():
        for workers in map(int, _WORKERS.value):
            data = txt2img.get_config("tiny").data
            data.update(source=spec, image_size=_SIZE.value, global_batch_size=_BATCH.value, worker_count=workers,
                        crop="random", random_flip=True)  # fmt: skip
            # Timed from the loader's creation: grain's read threads prefetch from the start, so a warm-up batch
            # would hide most of a small dataset's work. Worker start-up (about a second) is included.
            t0, count = time.perf_counter(), 0
            for batch in pipeline.make_loader(data, "train", _BATCH.value, tokenizer, num_epochs=1):
                count += len(batch["image"])
            seconds = time.perf_counter() - t0
            row = dict(source=name, workers=workers, images=count, seconds=round(seconds, 2),
                       images_per_s=round(count / seconds, 1))  # fmt: skip
            print(json.dumps(row))
            rows.append(row)
    print(f"\n| source | grain workers | images/s ({_SIZE.value}px random crop + flip + tokenize) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['source']} | {r['workers']} | {r['images_per_s']} |")


if __name__ == "__main__":
    app.run(main)
