"""Builders of small "own data" fixtures on disk, in the layouts users bring (``data.source``): img2dataset tar
shards with known bad members, an image folder with ``metadata.jsonl`` and every awkward PIL mode, class sub-folders,
and a TFDS dataset prepared without TensorFlow. Images are crops of the photos bundled with scikit-image and scenes
of the embedded shapes dataset, 8-48 px a side, and a DreamBooth subject; every builder returns what a test needs to know about its data
(keys, captions, labels, which records are bad and why).
"""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ldm_jax.data import shapes

# The bad records of the webdataset fixture, by key, and the preprocess.BAD_REASONS reason each one is counted as
# when captions are needed.
WDS_CORRUPT = "000000003"  # a .jpg member that is not a JPEG
WDS_NO_CAPTION = "000010002"  # no .txt, and a .json whose caption is null
WDS_NOT_UTF8 = "000010006"  # a .txt caption in Latin-1
WDS_TRUNCATED = "000020009"  # the last member of the last shard, cut short in the middle of its image
WDS_BAD = {
    WDS_CORRUPT: "unreadable_image",
    WDS_NO_CAPTION: "missing_caption",
    WDS_NOT_UTF8: "caption_not_utf8",
    WDS_TRUNCATED: "truncated",
}
# Good records that prepare_data's filters drop (--min_side=12 --max_aspect=3).
WDS_TOO_SMALL = "000010008"  # 8x8
WDS_TOO_WIDE = "000020004"  # 48 wide, 12 high
WDS_PNG = "000000005"  # a .png member
WDS_JSON_CAPTION = "000000007"  # caption only in the .json (no .txt)
WDS_SHARD_SIZES = (11, 11, 10)  # 32 samples: 4 steps of global batch 8 are exactly one epoch

CLASS_NAMES = ("cat", "coffee", "rocket")  # sub-folder names = classes, sorted -> labels 0, 1, 2
_CLASS_PHOTOS = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}


@functools.lru_cache(maxsize=None)
def _photo_array(name: str) -> np.ndarray:
    import skimage.data

    return np.asarray(getattr(skimage.data, name)())


def photo(name: str, top: int, left: int, side: int, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3]: a ``side``-pixel square crop of a scikit-image photo at (top, left) (wrapped to
    fit), resized."""
    full = _photo_array(name)
    top, left = top % (full.shape[0] - side + 1), left % (full.shape[1] - side + 1)
    a = full[top : top + side, left : left + side]
    return np.asarray(Image.fromarray(a).resize((width, height), Image.Resampling.LANCZOS), np.uint8)


def scene(index: int, size: int) -> tuple[np.ndarray, str]:
    """(image, caption) of the embedded shapes dataset's train example ``index`` at ``size`` pixels."""
    ex = shapes.generate_example("train", index, size, seed=0)
    return ex["image"], ex["caption"]


def encode(image: np.ndarray | Image.Image, fmt: str, **kw) -> bytes:
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000  # fixed: the shards' bytes do not depend on when the fixture was built
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(root: str) -> dict:
    """Three img2dataset-style shards ``root/{00000..00002}.tar``: per sample ``key.jpg`` (or .png), ``key.txt``
    and ``key.json``; one corrupt JPEG, one sample without a caption, one Latin-1 caption, one caption only in the
    .json, one tiny and one very wide image, and the last shard cut short in the middle of its last image.

    Returns {"spec", "pattern", "keys" (in source order), "captions" {key: [captions]}, "sizes" {key: (h, w)},
    "bad" {key: reason}}."""
    os.makedirs(root, exist_ok=True)
    keys, captions, sizes = [], {}, {}
    n = 0
    for shard, count in enumerate(WDS_SHARD_SIZES):
        path = os.path.join(root, f"{shard:05d}.tar")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(count):
                key = f"{shard:05d}{i:04d}"
                keys.append(key)
                if n % 3 == 0:
                    image = photo(("astronaut", "chelsea", "coffee", "rocket")[n % 4], 20 * n, 10 * n, 160, 24, 20)
                    text = f"a photo, number {n}, of {('an astronaut', 'a cat', 'a coffee cup', 'a rocket')[n % 4]}"
                else:
                    image, text = scene(n, 20)
                if key == WDS_TOO_SMALL:
                    image = image[:8, :8]
                if key == WDS_TOO_WIDE:
                    image = np.asarray(Image.fromarray(image).resize((48, 12)))
                sizes[key] = image.shape[:2]
                members = {}
                if key == WDS_CORRUPT:
                    members["jpg"] = b"\xff\xd8\xff\xe0 not a jpeg " + bytes(range(256)) * 4
                elif key == WDS_PNG:
                    members["png"] = encode(image, "PNG")
                else:
                    members["jpg"] = encode(image, "JPEG", quality=95)
                meta = {"key": key, "status": "success", "width": image.shape[1], "height": image.shape[0]}
                if key == WDS_NO_CAPTION:
                    meta["caption"] = None
                elif key == WDS_NOT_UTF8:
                    members["txt"] = "café crème, número {n}".format(n=n).encode("latin-1")
                elif key == WDS_JSON_CAPTION:
                    meta["caption"] = text
                    captions[key] = [text]
                else:
                    members["txt"] = text.encode("utf-8")
                    meta["caption"] = text
                    if key != WDS_TRUNCATED:  # a record cut short is read as an error, without captions
                        captions[key] = [text]
                members["json"] = json.dumps(meta).encode("utf-8")
                # The truncated sample's image comes last in its shard, so that cutting the shard cuts the image.
                order = ["txt", "json", "jpg", "png"] if key == WDS_TRUNCATED else ["jpg", "png", "txt", "json"]
                for ext in order:
                    if ext in members:
                        _add(tar, f"{key}.{ext}", members[ext])
                n += 1
        data = buf.getvalue()
        if shard == len(WDS_SHARD_SIZES) - 1:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                last = tar.getmembers()[-1]
            assert last.name == f"{WDS_TRUNCATED}.jpg"
            data = data[: last.offset_data + last.size // 2]
        with open(path, "wb") as f:
            f.write(data)
    pattern = os.path.join(root, "{00000..00002}.tar")
    return {
        "spec": f"webdataset:{pattern}",
        "pattern": pattern,
        "keys": keys,
        "captions": captions,
        "sizes": sizes,
        "bad": dict(WDS_BAD),
    }


def _exif_rotated(upright: np.ndarray) -> bytes:
    """A JPEG that stores ``upright`` turned a quarter anticlockwise, with EXIF orientation 6 ("rotate 90 CW to
    display"): a viewer that applies the orientation shows ``upright``."""
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def write_folder(root: str) -> dict:
    """An image folder with ``metadata.jsonl`` (file_name + text; one image with a list of two captions), a
    sidecar-captioned image, and one image in each awkward mode: CMYK JPEG, 16-bit grey PNG (I;16), RGBA PNG with a
    transparent half, palette PNG, and a JPEG with EXIF orientation 6.

    Returns {"spec", "root", "files" (sorted), "captions" {file: [captions]}, "arrays" {file: the expected upright
    RGB content, full size}}."""
    os.makedirs(root, exist_ok=True)
    files, captions, arrays = {}, {}, {}

    def put(name, data, caps, expected=None):
        files[name] = data
        captions[name] = caps
        if expected is not None:
            arrays[name] = expected

    astronaut = photo("astronaut", 0, 150, 220, 20, 20)
    put("astronaut.jpg", encode(astronaut, "JPEG", quality=95), ["an astronaut in a white space suit"])
    cat = photo("chelsea", 40, 120, 200, 24, 16)  # 16 high, 24 wide: the centre crop at 16 px is [:, 4:20]
    put("chelsea.png", encode(cat, "PNG"), ["a ginger cat", "a cat with long white whiskers"], cat)
    coffee = photo("coffee", 50, 150, 250, 16, 16)
    put("coffee_cmyk.jpg", encode(Image.fromarray(coffee).convert("CMYK"), "JPEG", quality=100), ["a cup"], coffee)
    levels = np.round(np.linspace(0, 255, 16)).astype(np.uint16)
    gray16 = np.tile(levels * 257, (16, 1))  # a left-to-right ramp over the full 16-bit range
    put("gradient16.png", encode(Image.fromarray(gray16), "PNG"), ["a grey ramp"], np.tile(levels, (16, 1)))
    rocket = photo("rocket", 100, 300, 200, 16, 16)
    rgba = np.concatenate([rocket, np.full((16, 16, 1), 255, np.uint8)], -1)
    rgba[:, :8, 3] = 0  # the left half transparent: white once composited
    expected = rocket.copy()
    expected[:, :8] = 255
    put("rocket_rgba.png", encode(rgba, "PNG"), ["a rocket, half of it transparent"], expected)
    pal = Image.fromarray(photo("coffee", 0, 0, 300, 16, 16)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    put("coffee_palette.png", encode(pal, "PNG"), ["a coffee cup in eight colours"], np.asarray(pal.convert("RGB")))
    upright = np.zeros((24, 16, 3), np.uint8)
    upright[:12] = (230, 30, 30)  # red on top, blue below when the orientation is applied
    upright[12:] = (30, 30, 230)
    put("rotated.jpg", _exif_rotated(upright), ["red above blue"], upright)
    for i in range(3):
        image, text = scene(100 + i, 20)
        put(f"scene_{i}.png", encode(image, "PNG"), [text], image)
    for name, data in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        for name, caps in captions.items():
            text = caps if len(caps) > 1 else caps[0]
            f.write(json.dumps({"file_name": name, "text": text}) + "\n")
    # Not in the metadata: captions from its sidecar .txt, one per line.
    sidecar = photo("rocket", 0, 200, 400, 20, 20)
    with open(os.path.join(root, "rocket_launch.jpg"), "wb") as f:
        f.write(encode(sidecar, "JPEG", quality=95))
    with open(os.path.join(root, "rocket_launch.txt"), "w") as f:
        f.write("a rocket on the launch pad\n\na white rocket under a blue sky\n")
    captions["rocket_launch.jpg"] = ["a rocket on the launch pad", "a white rocket under a blue sky"]
    return {"spec": f"folder:{root}", "root": root, "files": sorted(captions), "captions": captions, "arrays": arrays}


def write_class_folder(root: str, per_class: int = 4) -> dict:
    """``root/<class>/<i>.jpg`` for the classes ``CLASS_NAMES`` (crops of one photo per class).

    Returns {"spec", "root", "labels" {relative path: label}}."""
    labels = {}
    for label, name in enumerate(CLASS_NAMES):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            image = photo(_CLASS_PHOTOS[name], 30 * i, 40 * i, 200, 20, 20)
            rel = os.path.join(name, f"{i}.jpg")
            with open(os.path.join(root, rel), "wb") as f:
                f.write(encode(image, "JPEG", quality=95))
            labels[rel] = label
    return {"spec": f"folder:{root}", "root": root, "labels": labels}


def write_corrupt_folder(root: str, count: int = 3) -> str:
    """A folder whose every image is unreadable; returns its spec."""
    os.makedirs(root, exist_ok=True)
    for i in range(count):
        with open(os.path.join(root, f"{i}.jpg"), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 not a jpeg")
    return f"folder:{root}"


class OwnDataPhotos(tfds.core.GeneratorBasedBuilder):
    """A tiny captioned, labelled TFDS dataset (prepared locally as ArrayRecord, no TensorFlow): 20x24 photo crops
    with a caption and a class label."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Test fixture."}
    SPLIT_SIZES = {"train": 9, "validation": 3}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    # A raw uint8 tensor: features.Image would need TensorFlow to encode.
                    "image": tfds.features.Tensor(shape=(20, 24, 3), dtype=np.uint8),
                    "caption": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, n) for split, n in self.SPLIT_SIZES.items()}

    def _generate_examples(self, split, count):
        for i in range(count):
            yield i, tfds_example(split, i)


def tfds_example(split: str, i: int) -> dict:
    """Example ``i`` of the TFDS fixture's ``split``."""
    label = (i + (split == "validation")) % len(CLASS_NAMES)
    name = CLASS_NAMES[label]
    return {
        "image": photo(_CLASS_PHOTOS[name], 10 * i, 20 * i, 180, 24, 20),
        "caption": f"{split} photo {i} of a {name}",
        "label": label,
    }


def write_subject_folder(root: str, size: int = 16) -> str:
    """DreamBooth instance images: three pictures of one "subject" (a red square) on differently tinted grounds."""
    os.makedirs(root, exist_ok=True)
    lo, hi = size // 4, size - size // 4
    for i, ground in enumerate(((0, 0, 60), (0, 60, 0), (40, 40, 40))):
        a = np.zeros((size, size, 3), np.uint8) + np.array(ground, np.uint8)
        a[lo:hi, lo:hi] = (230, 20, 20)
        Image.fromarray(a).save(os.path.join(root, f"subject_{i}.png"))
    return root


def write_tfds(data_dir: str) -> dict:
    """Prepares ``OwnDataPhotos`` in ``data_dir``; returns {"name", "data_dir"}."""
    builder = OwnDataPhotos(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return {"name": OwnDataPhotos.name, "data_dir": data_dir}
