import glob
import os
import socket

import numpy as np
import pytest

from ldm_jax.tasks import validate_config
from ldm_jax.data import photos, pipeline


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("photo_tfds"))
    photos.get_builder("tiny", path)
    return path


def _rows(builder, split):
    source = builder.as_data_source(split)
    return [source[i] for i in range(len(source))]


def test_photos_load_offline(monkeypatch):
    """Every listed photo ships in the scikit-image wheel: loading it never touches the network."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    photos.load_photo.cache_clear()
    try:
        for name in photos.PHOTOS:
            photo = photos.load_photo(name)
            assert photo.mode == "RGB", name
            assert min(photo.size) >= 256, (name, photo.size)
    finally:
        photos.load_photo.cache_clear()  # later tests reload outside the monkeypatch


def test_split_photos_are_disjoint_and_cover_the_list():
    train, validation = set(photos.SPLIT_PHOTOS["train"]), set(photos.SPLIT_PHOTOS["validation"])
    assert not train & validation
    assert train | validation == set(photos.PHOTOS)
    assert len(validation) >= 2


def test_examples_are_deterministic_and_never_upscaled():
    a = photos.generate_example("train", 7, 32, seed=0)
    b = photos.generate_example("train", 7, 32, seed=0)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["photo"] == b["photo"]
    others = [photos.generate_example("train", 7, 32, seed=s) for s in (1, 2, 3)]
    assert any(not np.array_equal(a["image"], o["image"]) for o in others)
    for i in range(40):
        ex = photos.generate_example("validation", i, 64, seed=0)
        left, top, right, bottom = ex["crop_box"]
        assert right - left == bottom - top >= 64
        width, height = photos.load_photo(ex["photo"]).size
        assert 0 <= left and right <= width and 0 <= top and bottom <= height


def test_preparation_is_deterministic(photo_dir, tmp_path):
    first = photos.get_builder("tiny", photo_dir)
    second = photos.get_builder("tiny", str(tmp_path))
    for split in ("train", "validation"):
        rows_a, rows_b = _rows(first, split), _rows(second, split)
        assert len(rows_a) == len(rows_b) > 0
        for ra, rb in zip(rows_a, rows_b, strict=True):
            assert ra["image"].tobytes() == rb["image"].tobytes()
            assert ra["photo"] == rb["photo"]
            np.testing.assert_array_equal(ra["crop_box"], rb["crop_box"])
    # The record files themselves are byte-identical (same PNG bytes, same order).
    records = sorted(os.path.basename(p) for p in glob.glob(os.path.join(first.data_dir, "*.array_record*")))
    assert len(records) == 2
    for name in records:
        with (
            open(os.path.join(first.data_dir, name), "rb") as fa,
            open(os.path.join(second.data_dir, name), "rb") as fb,
        ):
            assert fa.read() == fb.read(), name


def test_prepared_images_are_real_rgb_crops_of_the_split_photos(photo_dir):
    builder = photos.get_builder("tiny", photo_dir)
    n = builder.builder_config.image_size
    for split in ("train", "validation"):
        rows = _rows(builder, split)
        used = {r["photo"].decode() for r in rows}
        assert used <= set(photos.SPLIT_PHOTOS[split])
        assert len(used) >= 2  # examples spread over the split's photos
        images = np.stack([r["image"] for r in rows])
        assert images.dtype == np.uint8 and images.shape == (len(rows), n, n, 3)
        stds = images.reshape(len(rows), -1).astype(np.float32).std(axis=1)
        assert np.mean(stds > 5.0) >= 0.9  # real content, not flat patches
        # Colour photos: channels differ (grayscale-as-RGB would have R == G == B everywhere).
        assert np.mean(np.abs(images[..., 0].astype(int) - images[..., 2].astype(int))) > 5
        # Stored examples are exactly the generator's (TFDS stores them in a key-hash order, not by index).
        want = {}
        for i in range(len(rows)):
            ex = photos.generate_example(split, i, n, builder.builder_config.seed)
            want[(ex["photo"], tuple(ex["crop_box"]), ex["flipped"])] = ex["image"]
        for r in rows:
            key = (r["photo"].decode(), tuple(r["crop_box"]), bool(r["flipped"]))
            np.testing.assert_array_equal(r["image"], want.pop(key))
        assert not want


def test_grain_loader_yields_uint8_batches_that_become_model_range_on_the_devices(photo_dir):
    from ldm_jax.training.sharding import batch_sharding, make_mesh

    data = pipeline.data_section("tiny", 16, 8)
    data.name = "photo_crops"
    data.data_dir = photo_dir
    batch = next(iter(pipeline.make_loader(data, "validation", data.global_batch_size, num_epochs=1)))
    # Beside the images: the size-conditioning fields and the bad-record codes every source provides.
    assert set(batch) == {"image", "original_size", "crop_offset", "_bad"}
    assert (batch["original_size"] == 16).all() and (batch["crop_offset"] == 0).all() and (batch["_bad"] == 0).all()
    # uint8 crosses from the workers and onto the devices (a quarter of float32's bytes) ...
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (8, 16, 16, 3)
    on_mesh = pipeline.to_global(batch, batch_sharding(make_mesh(-1, 1)))
    assert "_bad" not in on_mesh  # host-side bookkeeping stays behind
    images = np.asarray(on_mesh["image"])
    # ... and is the host conversion's float32, bit for bit, on the devices.
    assert images.dtype == np.float32
    np.testing.assert_array_equal(images, pipeline.to_model_range(batch["image"]))
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.std() > 0.05


def test_unknown_dataset_and_size_mismatch_are_rejected(photo_dir):
    data = pipeline.data_section("tiny", 32, 8)
    data.name = "photo_crops"
    data.data_dir = photo_dir
    with pytest.raises(ValueError, match="data.image_size=32"):
        pipeline.data_source(data, "train")
    with pytest.raises(ValueError, match="data.config='huge'"):
        photos.get_builder("huge", photo_dir)


def test_config_validation_names_the_dataset_field():
    from configs import autoencoder_kl

    config = autoencoder_kl.get_config("tiny")
    config.data.name = "imagenet"
    with pytest.raises(ValueError, match=r"data\.name='imagenet'.*photo_crops"):
        validate_config(config)
    config.data.name = "photo_crops"
    validate_config(config)
