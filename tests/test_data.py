import numpy as np
import pytest

from ldm_jax.data import shapes
from ldm_jax.evaluation import attributes


def test_examples_are_deterministic():
    a = shapes.generate_example("train", 5, 32, seed=0)
    b = shapes.generate_example("train", 5, 32, seed=0)
    c = shapes.generate_example("train", 5, 32, seed=1)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["caption"] == b["caption"]
    assert not (np.array_equal(a["image"], c["image"]) and a["caption"] == c["caption"])


def test_prepared_dataset_equals_generator_and_splits_are_disjoint(data_dir):
    builder = shapes.get_builder("tiny", data_dir)
    cfg = builder.builder_config
    combos = {}
    for split in ("train", "validation", "heldout"):
        source = builder.as_data_source(split)
        rows = [source[i] for i in range(len(source))]
        combos[split] = {(r["shape"], r["color"], r["position"]) for r in rows}
        # The stored records are exactly the generator's examples (same set of images and captions).
        want = sorted(
            shapes.generate_example(split, i, cfg.image_size, cfg.seed)["caption"] for i in range(len(source))
        )
        got = sorted(r["caption"].decode() for r in rows)
        assert got == want
    assert not combos["heldout"] & (combos["train"] | combos["validation"])
    train_triples, held_triples = shapes.triple_splits(cfg.seed)
    assert not set(train_triples) & set(held_triples)
    # Every single attribute value still occurs in training: held-out prompts are new combinations only.
    for axis, n in ((0, len(shapes.SHAPES)), (1, len(shapes.COLORS)), (2, len(shapes.POSITIONS))):
        assert {t[axis] for t in train_triples} == set(range(n))


def test_attribute_reader_on_dataset_images():
    ex = [shapes.generate_example("heldout", i, 32, 0) for i in range(120)]
    result = attributes.score([e["image"] for e in ex], [e["caption"] for e in ex])
    assert result["accuracy/color"] == 1.0
    assert result["accuracy/position"] == 1.0
    assert result["accuracy/size"] >= 0.98
    assert result["accuracy/shape"] >= 0.99
    big = [shapes.generate_example("heldout", i, 64, 0) for i in range(60)]
    assert attributes.score([e["image"] for e in big], [e["caption"] for e in big])["accuracy/shape"] >= 0.98


def test_shape_reader_reads_softened_edges_and_tells_the_shapes_apart():
    from scipy.ndimage import gaussian_filter

    ex = [shapes.generate_example("validation", i, 32, 0) for i in range(150)]
    images = np.stack([e["image"] for e in ex]).astype(np.float32)
    wanted = [{"shape": e["shape"]} for e in ex]
    # Edges softened by a Gaussian of 0.8 px, as a decoder softens them: still plainly squares and triangles.
    soft = np.clip(np.round(gaussian_filter(images, (0, 0.8, 0.8, 0))), 0, 255).astype(np.uint8)
    assert attributes.score_wanted(list(soft), wanted)["accuracy/shape"] >= 0.97
    # The first reader (how much of its bounding box the object fills) read the same images by their edge pixels.
    fills = []
    for img, e in zip(soft.astype(np.float32), ex, strict=True):
        bg = np.median(img.reshape(-1, 3), axis=0)
        fills.append(attributes.fill_ratio_shape(np.linalg.norm(img - bg, axis=-1) > 60.0) == e["shape"])
    assert np.mean(fills) < 0.8
    # Every image scored against another shape than it shows: (almost) never read as that one.
    other = [{"shape": (e["shape"] + k) % 3} for k in (1, 2) for e in ex]
    assert attributes.score_wanted(list(soft) * 2, other)["accuracy/shape"] <= 0.02


def test_attribute_reader_rejects_wrong_images():
    ex = [shapes.generate_example("train", i, 32, 0) for i in range(60)]
    # Pair every image with another example's caption: accuracy must fall towards chance.
    prompts = [e["caption"] for e in ex[1:] + ex[:1]]
    result = attributes.score([e["image"] for e in ex], prompts)
    assert result["accuracy/color"] < 0.5
    blank = np.full((32, 32, 3), 128, np.uint8)
    assert attributes.score([blank], [ex[0]["caption"]])["no_object_rate"] == 1.0


def test_shape_confusion_tells_a_wrong_shape_from_an_ignored_one():
    ex = [shapes.generate_example("validation", i, 32, 0) for i in range(90)]
    images = [e["image"] for e in ex]
    wanted = [{"shape": e["shape"]} for e in ex]
    # The dataset's own images: every asked shape is read as itself.
    confusion = attributes.shape_confusion(images, wanted)
    assert set(confusion) == set(shapes.SHAPES)
    for asked, row in confusion.items():
        assert row[asked] >= 0.95 and sum(row.values()) == pytest.approx(1.0)
    # Each image asked as the next shape: the mass moves off the diagonal, to the shape actually drawn.
    shifted = attributes.shape_confusion(images, [{"shape": (w["shape"] + 1) % 3} for w in wanted])
    for k, asked in enumerate(shapes.SHAPES):
        assert shifted[asked][shapes.SHAPES[(k - 1) % 3]] >= 0.95
    # A model that draws one shape whatever is asked: every row alike; no object at all: "none".
    circles = [e["image"] for e in ex if e["shape"] == shapes.SHAPES.index("circle")][:30]
    same = attributes.shape_confusion(circles * 3, [{"shape": k} for k in range(3) for _ in circles])
    assert all(row["circle"] >= 0.95 for row in same.values())
    blank = np.full((32, 32, 3), 128, np.uint8)
    assert attributes.shape_confusion([blank], [{"shape": 1}]) == {
        "square": {"circle": 0.0, "square": 0.0, "triangle": 0.0, "none": 1.0}
    }
    # Conditions without a shape (a colour class) are left out.
    assert attributes.shape_confusion([images[0]], [{"color": 0}]) == {}


def test_parse_caption_errors():
    with pytest.raises(ValueError, match="not a shapes-dataset caption"):
        attributes.parse_caption("a photo of a cat")


def test_read_options_change_neither_the_batches_nor_their_order(data_dir):
    """data.read_threads and data.prefetch_buffer_size reach grain's reader, and only change how far it reads
    ahead: the batches and their order are the same with one thread and a one-example buffer."""
    from configs import txt2img
    from ldm_jax.data import pipeline
    from ldm_jax.data.tokenizer import CLIPTokenizer

    config = txt2img.get_config("tiny")
    config.data.data_dir = data_dir
    tokenizer = CLIPTokenizer(config.text_encoder.max_length, config.text_encoder.pad_token)
    batches = {}
    for threads, buffer in ((1, 1), (4, 128)):
        config.data.read_threads, config.data.prefetch_buffer_size = threads, buffer
        loader = pipeline.make_loader(config.data, "train", 8, tokenizer, start_step=3)
        assert (loader._read_options.num_threads, loader._read_options.prefetch_buffer_size) == (threads, buffer)
        it = iter(loader)
        batches[threads] = [next(it) for _ in range(4)]
    for a, b in zip(batches[1], batches[4], strict=True):
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
