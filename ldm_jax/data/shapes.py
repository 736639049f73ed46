"""The embedded captioned dataset: procedurally drawn shapes with attribute captions, as a TFDS builder.

Every image shows one shape (circle, square, triangle) of one colour and size at one of nine positions on a plain
background, captioned e.g. "a small red circle at the top left on a black background". Examples are a pure
function of (seed, split, index), so preparing twice gives identical files.

Splits:
  train       (shape, colour, position) triples of the training set, any size and background;
  validation  the same triples, different draws (for reconstruction metrics);
  heldout     triples that never occur in train or validation (compositional generalisation).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from ldm_jax.data.prepare import prepared_builder

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 205, 215),
}
SIZES = ("small", "large")
# Row-major 3x3 grid, index = 3 * row + col.
POSITIONS = (
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)
BACKGROUNDS = {"black": (20, 20, 20), "gray": (128, 128, 128), "white": (240, 240, 240)}
COLOR_NAMES = tuple(COLORS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
ATTRIBUTE_VALUES = {
    "shape": SHAPES,
    "color": COLOR_NAMES,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUND_NAMES,
}
# Class labelings for class-conditional models: the attributes whose combination is the class.
LABELINGS = {"shape": ("shape",), "color": ("color",), "shape_color": ("color", "shape")}


def num_classes(labeling: str) -> int:
    if labeling not in LABELINGS:
        raise ValueError(f"classes={labeling!r}: must be one of {tuple(LABELINGS)}")
    return int(np.prod([len(ATTRIBUTE_VALUES[a]) for a in LABELINGS[labeling]]))


def class_label(example: dict, labeling: str) -> int:
    """The class id of an example (mixed radix over the labeling's attributes, first attribute most significant)."""
    label = 0
    for attr in LABELINGS[labeling]:
        label = label * len(ATTRIBUTE_VALUES[attr]) + int(example[attr])
    return label


def class_name(label: int, labeling: str) -> str:
    """e.g. "red circle" for shape_color."""
    words = []
    for attr in reversed(LABELINGS[labeling]):
        n = len(ATTRIBUTE_VALUES[attr])
        words.append(ATTRIBUTE_VALUES[attr][label % n])
        label //= n
    return " ".join(reversed(words))


# Radius as a fraction of the image side.
SIZE_RADIUS = {"small": 0.11, "large": 0.19}
HELDOUT_FRACTION = 0.12
_SPLIT_CODES = {"train": 0, "validation": 1, "heldout": 2}


def caption(shape: str, color: str, size: str, position: str, background: str) -> str:
    return f"a {size} {color} {shape} {position} on a {background} background"


def triple_splits(seed: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """Partitions all (shape, colour, position) index triples into (train, heldout), deterministically."""
    triples = list(itertools.product(range(len(SHAPES)), range(len(COLORS)), range(len(POSITIONS))))
    order = np.random.default_rng([seed, 7]).permutation(len(triples))
    n_held = int(round(HELDOUT_FRACTION * len(triples)))
    held = sorted(triples[i] for i in order[:n_held])
    train = sorted(triples[i] for i in order[n_held:])
    return train, held


# Half the side of a square of radius r, in units of r: the square has the circle's area.
SQUARE_HALF = 0.886


def triangle_vertices(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The upright triangle of radius ``r`` centred at (cx, cy): apex 1.3 r above the centre, base 0.78 r below."""
    h = r * 1.3
    return [(cx, cy - h), (cx - h * 0.866 * 1.15, cy + h * 0.6), (cx + h * 0.866 * 1.15, cy + h * 0.6)]


def render(shape: int, color: int, size: int, position: int, background: int, image_size: int, rng) -> np.ndarray:
    """Draws one scene as uint8 [image_size, image_size, 3]; ``rng`` jitters position, size and colour slightly."""
    scale = 4  # draw at 4x and downsample for anti-aliased edges
    s = image_size * scale
    bg = np.array(BACKGROUNDS[BACKGROUND_NAMES[background]]) + rng.integers(-8, 9, 3)
    fg = np.array(COLORS[COLOR_NAMES[color]]) + rng.integers(-15, 16, 3)
    img = Image.new("RGB", (s, s), tuple(int(v) for v in np.clip(bg, 0, 255)))
    draw = ImageDraw.Draw(img)
    row, col = divmod(position, 3)
    cx = (col + 0.5) / 3 * s + rng.uniform(-1, 1) * s / 30
    cy = (row + 0.5) / 3 * s + rng.uniform(-1, 1) * s / 30
    r = SIZE_RADIUS[SIZES[size]] * s * rng.uniform(0.9, 1.1)
    fill = tuple(int(v) for v in np.clip(fg, 0, 255))
    name = SHAPES[shape]
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif name == "square":
        h = r * SQUARE_HALF
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        draw.polygon(triangle_vertices(cx, cy, r), fill=fill)
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def generate_example(split: str, index: int, image_size: int, seed: int) -> dict:
    """The ``index``-th example of ``split``: a pure function of its arguments."""
    train, held = triple_splits(seed)
    triples = held if split == "heldout" else train
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    shape, color, position = triples[rng.integers(len(triples))]
    size = int(rng.integers(len(SIZES)))
    background = int(rng.integers(len(BACKGROUNDS)))
    image = render(shape, color, size, position, background, image_size, rng)
    return {
        "image": image,
        "caption": caption(
            SHAPES[shape], COLOR_NAMES[color], SIZES[size], POSITIONS[position], BACKGROUND_NAMES[background]
        ),
        "shape": shape,
        "color": color,
        "size": size,
        "position": position,
        "background": background,
    }


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    image_size: int = 32
    num_train: int = 20000
    num_validation: int = 500
    num_heldout: int = 1000
    seed: int = 0


class ShapesCaptions(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for the procedural captioned shapes; prepared offline (nothing is downloaded)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        ShapesConfig(name="32px", description="32x32 images, 20k train", image_size=32),
        ShapesConfig(name="64px", description="64x64 images, 50k train", image_size=64, num_train=50000),
        ShapesConfig(name="256px", description="256x256 images, 100k train", image_size=256, num_train=100000),
        ShapesConfig(
            name="tiny", description="16x16, for tests", image_size=16, num_train=256, num_validation=32, num_heldout=64
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        n = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    # A raw uint8 tensor rather than features.Image: encoding PNGs through TFDS would need TensorFlow.
                    "image": tfds.features.Tensor(shape=(n, n, 3), dtype=np.uint8),
                    "caption": tfds.features.Text(),
                    "shape": tfds.features.ClassLabel(names=SHAPES),
                    "color": tfds.features.ClassLabel(names=COLOR_NAMES),
                    "size": tfds.features.ClassLabel(names=SIZES),
                    "position": tfds.features.ClassLabel(names=[p.replace(" ", "_") for p in POSITIONS]),
                    "background": tfds.features.ClassLabel(names=BACKGROUND_NAMES),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        c = self.builder_config
        return {
            "train": self._generate_examples("train", c.num_train),
            "validation": self._generate_examples("validation", c.num_validation),
            "heldout": self._generate_examples("heldout", c.num_heldout),
        }

    def _generate_examples(self, split: str, count: int):
        c = self.builder_config
        for i in range(count):
            yield i, generate_example(split, i, c.image_size, c.seed)


def get_builder(config_name: str, data_dir: str = "") -> ShapesCaptions:
    """Returns the builder, preparing the dataset offline on first use."""
    return prepared_builder(ShapesCaptions, config_name, data_dir)
