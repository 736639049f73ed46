"""A real-image dataset: random square crops of the colour photographs bundled with scikit-image, as a TFDS builder.

For training and evaluating first-stage autoencoders on natural content (textures, edges, skin, fur, sky) rather
than the flat-coloured procedural shapes. Nothing is downloaded: only photos whose files ship inside the
scikit-image wheel are used (many ``skimage.data`` functions fetch through pooch and fail offline).

Splits, by source photo (so validation measures generalisation to images the model never saw):
  train       astronaut (portrait), coffee (cup on a table), motorcycle (left view of the stereo pair, street
              scene), hubble_deep_field (space telescope), immunohistochemistry (stained tissue, microscope),
              retina (fundus photograph);
  validation  chelsea (a cat: fur, whiskers) and rocket (launch pad, sky, trees): held-out photos.

Only RGB photos are used: the bundled grayscale ones (camera, coins, moon, brick, grass, ...) would enter as R=G=B
crops, a chroma distribution no colour photo has, and would skew what a colour autoencoder learns. The right view
of the stereo motorcycle pair is left out: it is nearly the left one, and adds no new content.

Example i of a split is a pure function of (seed, split, i, image_size): a photo drawn uniformly from the split's
list, a square crop whose side is log-uniform in [1/8, 1/2] of the photo's shorter side (never smaller than the
output size, so crops are only ever downscaled: upscaled crops would teach the autoencoder blur), resized with
Lanczos (antialiased), flipped horizontally with probability 1/2. Preparing twice gives identical files.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ldm_jax.data.prepare import prepared_builder

# Photo name -> (skimage.data function, index into its result when it returns a tuple, else None).
# Each loads from the wheel's own data folder (see tests/test_photos.py::test_photos_load_offline).
_SOURCES = {
    "astronaut": ("astronaut", None),
    "coffee": ("coffee", None),
    "motorcycle": ("stereo_motorcycle", 0),  # (left, right, disparity): the left view
    "hubble_deep_field": ("hubble_deep_field", None),
    "immunohistochemistry": ("immunohistochemistry", None),
    "retina": ("retina", None),
    "chelsea": ("chelsea", None),
    "rocket": ("rocket", None),
}
SPLIT_PHOTOS = {
    "train": ("astronaut", "coffee", "motorcycle", "hubble_deep_field", "immunohistochemistry", "retina"),
    "validation": ("chelsea", "rocket"),
}
PHOTOS = tuple(_SOURCES)
# Crop side as a fraction of the photo's shorter side, sampled log-uniformly (equal weight per octave of scale).
MIN_CROP_FRACTION = 1 / 8
MAX_CROP_FRACTION = 1 / 2
_SPLIT_CODES = {"train": 0, "validation": 1}


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> Image.Image:
    """The named photo as an RGB PIL image (decoded once per process)."""
    if name not in _SOURCES:
        raise ValueError(f"photo={name!r}: must be one of {PHOTOS}")
    import skimage.data  # imported here so that importing the pipeline does not pull in scikit-image

    function, index = _SOURCES[name]
    array = getattr(skimage.data, function)()
    if index is not None:
        array = array[index]
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"photo={name!r}: skimage.data.{function} gave {array.dtype} {array.shape}, not uint8 HxWx3")
    return Image.fromarray(array)


def crop_side_range(width: int, height: int, image_size: int) -> tuple[float, float]:
    """[lo, hi] of the crop side in source pixels: the fractions of the shorter side, raised to at least
    ``image_size`` (clipped to the shorter side) so that no crop is upscaled."""
    short = min(width, height)
    lo = max(MIN_CROP_FRACTION * short, min(image_size, short))
    return lo, max(MAX_CROP_FRACTION * short, lo)


def generate_example(split: str, index: int, image_size: int, seed: int) -> dict:
    """The ``index``-th example of ``split``: a pure function of its arguments. The image is uint8 [n, n, 3]."""
    if split not in SPLIT_PHOTOS:
        raise ValueError(f"split={split!r}: must be one of {tuple(SPLIT_PHOTOS)}")
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    names = SPLIT_PHOTOS[split]
    name = names[int(rng.integers(len(names)))]
    photo = load_photo(name)
    width, height = photo.size
    lo, hi = crop_side_range(width, height, image_size)
    side = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
    side = min(max(side, 1), width, height)
    left = int(rng.integers(width - side + 1))
    top = int(rng.integers(height - side + 1))
    flipped = bool(rng.random() < 0.5)
    box = (left, top, left + side, top + side)
    # Lanczos over the box only: PIL widens the kernel by the scale factor, so the downscale is antialiased.
    crop = photo.resize((image_size, image_size), Image.Resampling.LANCZOS, box=box)
    if flipped:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return {
        "image": np.asarray(crop, dtype=np.uint8),
        "photo": name,
        "crop_box": np.array(box, dtype=np.int32),
        "flipped": flipped,
    }


def png_bytes(image: np.ndarray) -> bytes:
    """PNG-encodes a uint8 image: TFDS without TensorFlow stores ``features.Image`` only as encoded bytes."""
    buf = io.BytesIO()
    # Level 1: photo crops barely compress further (256px: ~120 kB at level 1, ~111 kB at the default 6) while
    # encoding is ~4x faster, and encoding dominates preparation at 256px.
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@dataclasses.dataclass
class PhotoCropsConfig(tfds.core.BuilderConfig):
    image_size: int = 32
    num_train: int = 20000
    num_validation: int = 512
    seed: int = 0


class PhotoCrops(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for random crops of scikit-image's bundled photos; prepared offline (nothing is downloaded)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        PhotoCropsConfig(name="32px", description="32x32 crops, 20k train", image_size=32),
        PhotoCropsConfig(name="64px", description="64x64 crops, 50k train", image_size=64, num_train=50000),
        # Without TensorFlow a split must stay under TFDS's in-memory shuffle buffer (1000 MiB, shuffle.py): past it
        # TFDS spills to disk through tf.io.gfile and fails. 256px PNG crops average ~120 kB, so 6k train ~ 0.75 GB.
        # At 256px every crop has the minimum side of 256 source pixels on the smaller photos (only position varies).
        PhotoCropsConfig(name="256px", description="256x256 crops, 6k train", image_size=256, num_train=6000),
        PhotoCropsConfig(name="tiny", description="16x16, for tests", image_size=16, num_train=128, num_validation=32),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        n = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(n, n, 3), dtype=np.uint8, encoding_format="png"),
                    "photo": tfds.features.Text(),
                    # (left, top, right, bottom) in the source photo's pixels, before the flip.
                    "crop_box": tfds.features.Tensor(shape=(4,), dtype=np.int32),
                    "flipped": tfds.features.Tensor(shape=(), dtype=np.bool_),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        return {
            "train": self._generate_examples("train", c.num_train),
            "validation": self._generate_examples("validation", c.num_validation),
        }

    def _generate_examples(self, split: str, count: int):
        c = self.builder_config
        for i in range(count):
            example = generate_example(split, i, c.image_size, c.seed)
            example["image"] = png_bytes(example["image"])
            yield i, example


def get_builder(config_name: str, data_dir: str = "") -> PhotoCrops:
    """Returns the builder, preparing the dataset offline on first use."""
    return prepared_builder(PhotoCrops, config_name, data_dir)
