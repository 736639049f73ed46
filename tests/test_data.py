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
    assert result["accuracy/shape"] >= 0.85


def test_attribute_reader_rejects_wrong_images():
    ex = [shapes.generate_example("train", i, 32, 0) for i in range(60)]
    # Pair every image with another example's caption: accuracy must fall towards chance.
    prompts = [e["caption"] for e in ex[1:] + ex[:1]]
    result = attributes.score([e["image"] for e in ex], prompts)
    assert result["accuracy/color"] < 0.5
    blank = np.full((32, 32, 3), 128, np.uint8)
    assert attributes.score([blank], [ex[0]["caption"]])["no_object_rate"] == 1.0


def test_parse_caption_errors():
    with pytest.raises(ValueError, match="not a shapes-dataset caption"):
        attributes.parse_caption("a photo of a cat")
