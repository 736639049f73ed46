"""Training on the user's own data (``data.source``): the four source kinds, decoding and cropping, bad records,
training through the real loop on each kind of task, ``ldm_jax.prepare_data`` and resuming on an own source.

The fixtures (tests/own_data.py) hold known bad records, so the counts asserted here are exact."""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import re
import time

import jax
import numpy as np
import own_data
import pytest
from cli import ROOT, run_module
from PIL import Image

from ldm_jax.data import pipeline, preprocess, sources
from ldm_jax.training import loop

S = 16  # the tiny presets' image size


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """Every fixture dataset, built once for the module."""
    root = tmp_path_factory.mktemp("own_data")
    return {
        "wds": own_data.write_webdataset(str(root / "wds")),
        "folder": own_data.write_folder(str(root / "folder")),
        "classes": own_data.write_class_folder(str(root / "classes")),
        "tfds": own_data.write_tfds(str(root / "tfds")),
        "root": root,
    }


def _metrics(workdir: str) -> dict[int, dict]:
    """{step: {name: value}} from metrics.jsonl; later rows of a step (a resumed run) update earlier ones."""
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            rows.setdefault(row.pop("step"), {}).update(row)
    return rows


def _finite_losses(rows: dict[int, dict]) -> None:
    losses = [v for row in rows.values() for k, v in row.items() if k.startswith("train/") and "loss" in k]
    assert losses, rows
    assert all(isinstance(v, float) and np.isfinite(v) for v in losses), rows


def _bad_counts(row: dict) -> dict[str, int]:
    return {k.removeprefix("data/bad/"): int(v) for k, v in row.items() if k.startswith("data/bad/")}


# --- sources --------------------------------------------------------------------------------------------------


def test_webdataset_source_indexes_shards_and_reads_captions(own):
    wds = own["wds"]
    src = sources.open_source(wds["spec"])
    assert len(src) == len(wds["keys"]) == 32 and len(src.shards) == 3
    records = [src[i] for i in range(len(src))]
    assert [r["key"] for r in records] == wds["keys"]
    for r in records:
        assert r["captions"] == wds["captions"].get(r["key"], []), r["key"]
        assert r["label"] == -1
        if r["key"] == own_data.WDS_TRUNCATED:
            assert r["error"] == "truncated" and r["image"] is None
        elif r["key"] == own_data.WDS_NOT_UTF8:
            assert r["error"] == "caption_not_utf8" and r["image"] is not None
        else:
            assert r["error"] == "" and isinstance(r["image"], bytes), r["key"]
    by_key = {r["key"]: r for r in records}
    assert by_key[own_data.WDS_JSON_CAPTION]["captions"]  # from the .json when there is no .txt
    assert by_key[own_data.WDS_PNG]["image"][:8] == b"\x89PNG\r\n\x1a\n"
    # A glob and a list name the same shards; random access does not depend on the reading order.
    shards_dir = os.path.dirname(wds["pattern"])
    globbed = sources.open_source(f"webdataset:{shards_dir}/*.tar")
    listed = sources.open_source(f"webdataset:{shards_dir}/{{00000,00001,00002}}.tar")
    assert globbed.shards == listed.shards == src.shards
    assert [globbed[i]["key"] for i in (31, 0, 17)] == [wds["keys"][i] for i in (31, 0, 17)]
    assert sources.expand_braces("a{8..10}/{x,y}{00..01}") == [
        "a8/x00", "a8/x01", "a8/y00", "a8/y01", "a9/x00", "a9/x01", "a9/y00", "a9/y01",
        "a10/x00", "a10/x01", "a10/y00", "a10/y01",
    ]  # fmt: skip


def test_folder_source_reads_metadata_and_sidecar_captions(own):
    folder = own["folder"]
    src = sources.open_source(folder["spec"])
    assert len(src) == len(folder["files"]) == 11
    assert src.class_names == []
    for i in range(len(src)):
        r = src[i]
        assert r["error"] == "" and r["label"] == -1
        assert r["captions"] == folder["captions"][r["key"]], r["key"]
    keys = [src[i]["key"] for i in range(len(src))]
    assert keys == folder["files"]
    two = src[keys.index("chelsea.png")]["captions"]
    assert two == ["a ginger cat", "a cat with long white whiskers"]  # a list in metadata.jsonl
    assert len(src[keys.index("rocket_launch.jpg")]["captions"]) == 2  # sidecar lines, the blank one skipped


def test_folder_metadata_csv_and_caption_column(own, tmp_path):
    import csv
    import shutil

    root = tmp_path / "csv"
    shutil.copytree(own["classes"]["root"], root)
    labels = own["classes"]["labels"]
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "prompt", "text"])
        for rel in labels:
            w.writerow([rel.replace(os.sep, "/"), f"prompt for {rel}", f"text for {rel}"])
    src = sources.open_source(f"folder:{root}")  # "text" by default
    assert {src[i]["key"]: src[i]["captions"] for i in range(len(src))} == {r: [f"text for {r}"] for r in labels}
    src = sources.open_source(f"folder:{root}", caption_key="prompt")  # data.caption_key names the column
    assert src[0]["captions"] == [f"prompt for {src[0]['key']}"] and src[0]["label"] == 0
    with pytest.raises(ValueError, match=r"data\.source=.*metadata\.csv needs a 'file_name' column and a caption"):
        sources.open_source(f"folder:{root}", caption_key="title")


def test_sources_survive_pickling_for_grain_workers(own):
    """data.worker_count > 0 sends the example source to grain's worker processes."""
    import pickle

    t = own["tfds"]
    specs = [(own["wds"]["spec"], {}), (own["folder"]["spec"], {}), (own["classes"]["spec"], {})]
    specs.append((f"tfds:{t['name']}", dict(data_dir=t["data_dir"], caption_key="caption", label_key="label")))
    for spec, kw in specs:
        src = preprocess.ExampleSource(sources.open_source(spec, **kw), S, "random", True, 7, ())
        copy_ = pickle.loads(pickle.dumps(src))
        for position in (0, 5):
            a, b = src.get(2, position), copy_.get(2, position)
            assert a.keys() == b.keys(), spec
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{spec} {k}")


def test_eval_source_feeds_previews_with_centre_crops(own):
    data = _data_config(
        source=own["folder"]["spec"], eval_source=own["classes"]["spec"], crop="random", random_flip=True
    )
    train, val = pipeline.data_source(data, "train"), pipeline.data_source(data, "validation")
    assert len(train) == 11 and len(val) == 12
    assert (train.crop, train.flip) == ("random", True) and (val.crop, val.flip) == ("center", False)
    images = pipeline.first_images(data, "validation", 3)
    assert images.shape == (3, S, S, 3) and images.dtype == np.float32 and -1 <= images.min() <= images.max() <= 1
    np.testing.assert_array_equal(images[0], pipeline.to_model_range(val[0]["image"]))


def test_class_folders_give_sorted_labels(own):
    classes = own["classes"]
    src = sources.open_source(classes["spec"])
    assert src.class_names == list(own_data.CLASS_NAMES) == ["cat", "coffee", "rocket"]
    assert len(src) == len(classes["labels"]) == 12
    got = {src[i]["key"]: src[i]["label"] for i in range(len(src))}
    assert got == classes["labels"]
    # The same folder through the pipeline, as class_cond runs see it.
    data = _data_config(source=classes["spec"])
    assert pipeline.source_class_names(data) == ["cat", "coffee", "rocket"]


def test_class_folders_may_be_symlinks_and_a_link_loop_is_not_followed(own, tmp_path):
    # Class folders linked in from elsewhere (as torchvision's ImageFolder reads them), plus a link back to the root:
    # followed, os.walk would descend forever; the root is already seen, so it is skipped.
    root = tmp_path / "linked"
    root.mkdir()
    *linked, real = own_data.CLASS_NAMES
    for name in linked:
        os.symlink(os.path.join(own["classes"]["root"], name), root / name)
    shutil.copytree(os.path.join(own["classes"]["root"], real), root / real)
    os.symlink(root, root / real / "loop")
    src = sources.open_source(f"folder:{root}")
    assert src.class_names == list(own_data.CLASS_NAMES)
    assert {src[i]["key"]: src[i]["label"] for i in range(len(src))} == own["classes"]["labels"]


def test_tfds_source_reads_a_prepared_dataset_without_tensorflow(own):
    import sys

    t = own["tfds"]
    spec = f"tfds:{t['name']}"
    src = sources.open_source(spec, t["data_dir"], "image", "caption", "label")
    assert len(src) == own_data.OwnDataPhotos.SPLIT_SIZES["train"] == 9
    assert src.class_names == list(own_data.CLASS_NAMES)
    expected = {own_data.tfds_example("train", i)["caption"]: own_data.tfds_example("train", i) for i in range(9)}
    seen = set()
    for i in range(len(src)):
        r = src[i]
        (caption,) = r["captions"]
        ex = expected[caption]
        assert r["label"] == ex["label"] and r["error"] == ""
        np.testing.assert_array_equal(r["image"], ex["image"])
        seen.add(caption)
    assert seen == set(expected)
    val = sources.open_source(f"{spec}:validation", t["data_dir"], "image", "caption", "label")
    assert len(val) == 3 and all(val[i]["captions"][0].startswith("validation") for i in range(3))
    # Without a caption key: images and labels only.
    bare = sources.open_source(spec, t["data_dir"], label_key="label")
    assert bare[0]["captions"] == [] and bare[0]["label"] >= 0
    assert "tensorflow" not in sys.modules
    with pytest.raises(ValueError, match=r"data\.source=.*data\.caption_key='text' is not a feature"):
        sources.open_source(spec, t["data_dir"], "image", "text")
    with pytest.raises(ValueError, match=r"data\.source=.*data\.label_key='class'"):
        sources.open_source(spec, t["data_dir"], "image", "caption", "class")
    with pytest.raises(
        ValueError, match=r"data\.label_key='caption' is a Text feature; class labels must be a .*ClassLabel"
    ):
        sources.open_source(spec, t["data_dir"], "image", "caption", "caption")
    with pytest.raises(ValueError, match=r"data\.source='tfds:no_such_dataset'.*could not be opened"):
        sources.open_source("tfds:no_such_dataset", t["data_dir"])


def test_unusable_sources_are_named(own, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    specs = {
        f"folder:{tmp_path}/missing": "no such folder",
        f"folder:{empty}": "no image files",
        f"webdataset:{tmp_path}/missing/{{00000..00001}}.tar": "no such shard",
        f"webdataset:{tmp_path}/*.tar": "matches no file",
        f"arrayrecord:{empty}": r"no \*\.array_record shards",
        "images:/data": "must be KIND:PATH",
        "folder:": "must be KIND:PATH",
    }
    for spec, why in specs.items():
        with pytest.raises(ValueError, match=re.escape(f"data.source={spec!r}") + ".*" + why):
            sources.open_source(spec)
    not_tar = tmp_path / "0.tar"
    not_tar.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ValueError, match="is not a readable tar file"):
        sources.open_source(f"webdataset:{not_tar}")
    # Buckets are read through a mount, not looked up as a local folder called "gs:".
    for spec in ("webdataset:gs://b/{00000..00001}.tar", "arrayrecord:gs://b/prepared", "folder:gs://b/images"):
        with pytest.raises(ValueError, match=re.escape(f"data.source={spec!r}: a URL;")):
            sources.open_source(spec)


def test_a_damaged_tar_header_mid_shard_is_an_error_not_a_shorter_shard(tmp_path, monkeypatch):
    """tarfile stops without an error at a damaged header past the first: the samples after it were left out,
    uncounted (the index cache kept the short index too)."""
    import tarfile

    monkeypatch.setenv(sources.INDEX_CACHE_ENV, str(tmp_path / "index"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(6):
            own_data._add(tar, f"{i:05d}.txt", f"caption {i}".encode())
    data = bytearray(buf.getvalue())
    good = tmp_path / "good.tar"
    good.write_bytes(data)
    assert len(sources.open_source(f"webdataset:{good}")) == 6
    data[3 * 1024 + 148 : 3 * 1024 + 156] = b"0000000\0"  # the 4th member's header checksum, now wrong
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data)
    with pytest.raises(ValueError, match=r"has a damaged tar header at byte 3072: the 3 sample\(s\) before it"):
        sources.open_source(f"webdataset:{bad}")


def test_a_bad_metadata_row_is_named_by_file_and_line(own, tmp_path):
    import shutil

    root = tmp_path / "meta"
    shutil.copytree(own["classes"]["root"], root)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
    rows = [json.dumps({"file_name": f, "text": "a photo"}) for f in files]
    (root / "metadata.jsonl").write_text("\n".join([rows[0], "{not json", *rows[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: not a JSON object"):
        sources.open_source(f"folder:{root}")
    (root / "metadata.jsonl").write_text("\n".join([rows[0], json.dumps({"file_name": files[1]})]) + "\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl: row 2 has no 'text' \(its keys: \['file_name'\]\)"):
        sources.open_source(f"folder:{root}")


def test_validate_config_names_a_missing_source_before_any_device_work(own, tmp_path, monkeypatch):
    from configs import txt2img

    from ldm_jax.tasks import validate_config

    config = txt2img.get_config("tiny")
    config.first_stage.workdir = str(tmp_path)  # never read: validation fails first
    config.data.source = f"folder:{tmp_path}/missing"
    with pytest.raises(ValueError, match=r"data\.source='folder:.*/missing': no such folder"):
        validate_config(config)
    config.data.source = own["folder"]["spec"]
    config.data.eval_source = f"webdataset:{tmp_path}/val-{{0..3}}.tar"
    with pytest.raises(ValueError, match=r"data\.eval_source='webdataset:.*': no such shard"):
        validate_config(config)
    config.data.eval_source = ""
    config.data.crop = "corner"
    with pytest.raises(ValueError, match=r"data\.crop"):
        validate_config(config)
    # The training entry point stops there: no mesh, no device arrays, nothing written.
    config.data.crop = "center"
    config.data.source = f"folder:{tmp_path}/missing"
    monkeypatch.setattr(loop, "make_mesh", lambda *a, **k: pytest.fail("device work before validation"))
    with pytest.raises(ValueError, match=r"data\.source="):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists() or not os.listdir(tmp_path / "run")


# --- decoding and cropping ----------------------------------------------------------------------------------


def _examples(spec: str, crop="center", flip=False, seed=0, needs=()):
    return preprocess.ExampleSource(sources.open_source(spec), S, crop, flip, seed, needs)


def test_every_image_mode_becomes_upright_rgb_of_the_right_size(own):
    folder = own["folder"]
    root = folder["root"]
    # The fixture holds the modes it claims to.
    modes = {n: Image.open(os.path.join(root, n)).mode for n in folder["files"]}
    assert modes["coffee_cmyk.jpg"] == "CMYK" and modes["gradient16.png"] == "I;16"
    assert modes["rocket_rgba.png"] == "RGBA" and modes["coffee_palette.png"] == "P"
    assert Image.open(os.path.join(root, "rotated.jpg")).getexif()[0x0112] == 6
    src = _examples(folder["spec"])
    keys = [src.raw[i]["key"] for i in range(len(src))]
    ex = {k: src[i] for i, k in enumerate(keys)}
    for k, e in ex.items():
        assert e["image"].dtype == np.uint8 and e["image"].shape == (S, S, 3), k
        assert e["_bad"] == 0 and e["caption"] in folder["captions"][k]
    arrays = folder["arrays"]
    # 16-bit grey: the 16-bit ramp is the 8-bit ramp, exactly, in all three channels.
    np.testing.assert_array_equal(ex["gradient16.png"]["image"], np.repeat(arrays["gradient16.png"][..., None], 3, -1))
    # CMYK: back to the RGB it was made from (within JPEG error).
    diff = np.abs(ex["coffee_cmyk.jpg"]["image"].astype(int) - arrays["coffee_cmyk.jpg"].astype(int))
    assert diff.mean() < 6, diff.mean()
    # RGBA on white: the transparent half is white, the opaque half the photo.
    np.testing.assert_array_equal(ex["rocket_rgba.png"]["image"], arrays["rocket_rgba.png"])
    np.testing.assert_array_equal(ex["coffee_palette.png"]["image"], arrays["coffee_palette.png"])
    # Lossless, non-square: resize is a no-op at 16 px high, the centre crop is the middle 16 of 24 columns.
    np.testing.assert_array_equal(ex["chelsea.png"]["image"], arrays["chelsea.png"][:, 4:20])
    assert tuple(ex["chelsea.png"]["original_size"]) == (16, 24)
    assert tuple(ex["chelsea.png"]["crop_offset"]) == (0, 4)
    # EXIF orientation 6: stored 24 wide x 16 high, upright 16 wide x 24 high, red above blue.
    rot = ex["rotated.jpg"]
    assert tuple(rot["original_size"]) == (24, 16)
    assert tuple(rot["crop_offset"]) == (4, 0)
    img = rot["image"].astype(int)
    assert (img[:6, :, 0] > 180).all() and (img[:6, :, 2] < 80).all(), img[:6, :, :].mean((0, 1))
    assert (img[-6:, :, 2] > 180).all() and (img[-6:, :, 0] < 80).all(), img[-6:, :, :].mean((0, 1))
    # Downscaled photos keep their content (astronaut 20x20 -> 16x16).
    astro = np.asarray(Image.open(os.path.join(root, "astronaut.jpg")).resize((S, S), Image.Resampling.LANCZOS))
    assert np.abs(ex["astronaut.jpg"]["image"].astype(int) - astro.astype(int)).mean() < 2


def test_to_rgb_and_resize_and_crop_directly():
    # Palette with transparency and LA grey+alpha composite on white; float images are clipped.
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.putpixel((0, 0), 1)
    p.info["transparency"] = 0
    out = np.asarray(preprocess.to_rgb(p))
    assert out.shape == (4, 4, 3) and tuple(out[0, 0]) == (200, 100, 50) and tuple(out[1, 1]) == (255, 255, 255)
    la = Image.fromarray(np.stack([np.full((2, 2), 50, np.uint8), np.array([[0, 255], [255, 255]], np.uint8)], -1))
    assert la.mode == "LA"
    out = np.asarray(preprocess.to_rgb(la))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (50, 50, 50)
    f = Image.fromarray(np.array([[-5.0, 100.4], [300.0, 7.6]], np.float32))
    np.testing.assert_array_equal(np.asarray(preprocess.to_rgb(f))[..., 0], [[0, 100], [255, 8]])
    # Shorter side to the size, then the centre square; a tall image crops rows.
    tall = Image.fromarray(np.arange(40 * 20 * 3, dtype=np.uint32).reshape(40, 20, 3).astype(np.uint8))
    crop, (top, left) = preprocess.resize_and_crop(tall, 20, "center", np.random.default_rng(0))
    assert (top, left) == (10, 0)
    np.testing.assert_array_equal(crop, np.asarray(tall)[10:30])
    small = Image.fromarray(np.zeros((5, 10, 3), np.uint8))
    crop, (top, left) = preprocess.resize_and_crop(small, 16, "center", np.random.default_rng(0))
    assert crop.shape == (16, 16, 3) and (top, left) == (0, 8)  # upscaled to 16 x 32


def test_a_dark_16bit_image_stays_dark():
    dark = Image.fromarray(np.full((4, 4), 200, np.uint16))  # 200 / 65535: black in 8 bits
    assert dark.mode == "I;16"
    assert np.asarray(preprocess.to_rgb(dark)).max() <= 1


def test_random_crop_and_flip_are_a_pure_function_of_seed_and_position(own):
    folder = own["folder"]
    i = folder["files"].index("chelsea.png")
    full = folder["arrays"]["chelsea.png"]  # 16 x 24: left offsets 0..8
    a = _examples(folder["spec"], "random", True, seed=3)
    b = _examples(folder["spec"], "random", True, seed=3)
    other_seed = _examples(folder["spec"], "random", True, seed=4)
    offsets, flips, by_seed = set(), set(), []
    for position in range(24):
        ex = a.get(i, position)
        again = b.get(i, position)
        np.testing.assert_array_equal(ex["image"], again["image"])
        assert ex["caption"] == again["caption"]
        top, left = (int(v) for v in ex["crop_offset"])
        assert top == 0 and 0 <= left <= 8
        window = full[:, left : left + S]
        flipped = np.array_equal(ex["image"], window[:, ::-1])
        assert flipped or np.array_equal(ex["image"], window), position
        offsets.add(left)
        flips.add(flipped)
        by_seed.append(np.array_equal(ex["image"], other_seed.get(i, position)["image"]))
    assert len(offsets) >= 4 and flips == {True, False}
    assert not all(by_seed)
    # Either caption of a two-caption image is drawn, depending on the position.
    captions = {a.get(i, p)["caption"] for p in range(24)}
    assert captions == set(folder["captions"]["chelsea.png"])
    # The centre crop: the same pixels at every position.
    center = _examples(folder["spec"])
    assert all(np.array_equal(center.get(i, p)["image"], full[:, 4:20]) for p in range(4))


# --- bad records ----------------------------------------------------------------------------------------------


def test_bad_records_are_counted_by_reason_and_replaced_by_the_next_good_one(own):
    wds = own["wds"]
    src = _examples(wds["spec"], needs=("caption",))
    counts = {r: 0 for r in preprocess.BAD_REASONS}
    for position in range(len(src)):
        ex = src.get(position, position)
        assert ex["image"].shape == (S, S, 3) and ex["image"].dtype == np.uint8
        assert ex["caption"], position  # every position filled with a captioned example
        code = int(ex["_bad"])
        key = wds["keys"][position]
        assert code == (preprocess.BAD_REASONS.index(wds["bad"][key]) + 1 if key in wds["bad"] else 0), key
        if code:
            counts[preprocess.BAD_REASONS[code - 1]] += 1
            # The next record takes the bad one's place, with the bad one's position's randomness.
            replacement = src.get((position + 1) % len(src), position)
            np.testing.assert_array_equal(ex["image"], replacement["image"])
            assert ex["caption"] == replacement["caption"]
    assert {r: c for r, c in counts.items() if c} == {
        "unreadable_image": 1,
        "missing_caption": 1,
        "caption_not_utf8": 1,
        "truncated": 1,
    }
    # Images only: a record without a caption is fine.
    images_only = _examples(wds["spec"])
    assert int(images_only.get(wds["keys"].index(own_data.WDS_NO_CAPTION), 0)["_bad"]) == 0
    # Labels needed but the source has none: every record is bad, so the source is unusable.
    with pytest.raises(ValueError, match=r"64 records in a row from record 5 are bad \(the first: missing_label\)"):
        _examples(wds["spec"], needs=("label",)).get(5, 0)


def test_a_source_of_only_bad_records_stops_with_its_name(tmp_path):
    spec = own_data.write_corrupt_folder(str(tmp_path / "corrupt"))
    src = _examples(spec)
    with pytest.raises(ValueError, match=r"folder .*corrupt \(3 images\): 64 records in a row .* unreadable_image"):
        src.get(0, 0)


def test_an_undecodable_caption_does_not_matter_when_captions_are_not_needed(own):
    wds = own["wds"]
    src = _examples(wds["spec"])
    assert int(src.get(wds["keys"].index(own_data.WDS_NOT_UTF8), 0)["_bad"]) == 0


def test_bad_record_count_reports_and_stops_past_max_bad_fraction():
    codes = {r: preprocess.BAD_REASONS.index(r) + 1 for r in preprocess.BAD_REASONS}
    count = preprocess.BadRecordCount("webdataset:/data/laion/{00000..00009}.tar", 0.32)
    count.add(np.zeros((6,), np.int32))
    count.add(np.array([codes["truncated"], 0], np.int32))
    metrics = count.check()
    assert metrics == {"data/bad/truncated": 1.0, "data/bad_fraction": 0.125}
    count.add(np.array([[codes["truncated"], codes["unreadable_image"]]], np.int32))
    assert count.check() == {"data/bad/truncated": 2.0, "data/bad/unreadable_image": 1.0, "data/bad_fraction": 0.3}
    count.add(np.array([codes["truncated"], 0], np.int32))
    with pytest.raises(ValueError) as e:
        count.check()
    msg = str(e.value)
    assert "webdataset:/data/laion/{00000..00009}.tar" in msg
    assert "4 of 12 examples" in msg and "33.3%" in msg and "data.max_bad_fraction=0.32" in msg
    assert "'truncated' (3)" in msg
    clean = preprocess.BadRecordCount("folder:/x", 0.0)
    clean.add(np.zeros((8,), np.int32))
    assert clean.check() == {"data/bad_fraction": 0.0}


# --- training through the real loop ---------------------------------------------------------------------------


def _data_config(**fields):
    from configs import autoencoder_kl

    data = autoencoder_kl.get_config("tiny").data
    data.update(fields)
    return pipeline.DataConfig.from_config(data, "data.")


def _wds_txt2img_config(own, data_dir, first_stage_workdir):
    from configs import txt2img

    config = txt2img.get_config("tiny")
    config.data.data_dir = data_dir
    config.first_stage.workdir = first_stage_workdir
    config.data.source = own["wds"]["spec"]
    config.data.crop, config.data.random_flip = "random", True
    config.data.max_bad_fraction = 0.2  # 4 of 32 records are bad
    config.train.update(num_steps=4, checkpoint_every=2, log_every=2)
    return config


def _expected_bad(own, config, first: int, last: int) -> dict[str, int]:
    """Bad records by reason at stream positions [first, last) of a run of ``config`` on the webdataset."""
    wds = own["wds"]
    order = pipeline.GlobalOrder(len(wds["keys"]), config.data.global_batch_size, config.data.shuffle_seed)
    out = {}
    for p in range(first, last):
        key = wds["keys"][order.record(p)]
        if key in wds["bad"]:
            out[wds["bad"][key]] = out.get(wds["bad"][key], 0) + 1
    return out


@pytest.fixture(scope="module")
def wds_txt2img_run(own, data_dir, first_stage_workdir, tmp_path_factory):
    config = _wds_txt2img_config(own, data_dir, first_stage_workdir)
    workdir = str(tmp_path_factory.mktemp("wds_txt2img"))
    state = loop.train_and_evaluate(config, workdir)
    return config, workdir, state


def test_txt2img_trains_on_webdataset_shards_and_counts_their_bad_records(own, wds_txt2img_run):
    config, workdir, state = wds_txt2img_run
    assert int(state.step) == 4
    rows = _metrics(workdir)
    _finite_losses(rows)
    g = config.data.global_batch_size
    # 4 steps of 8 = one epoch of 32 records: every bad record exactly once by the end.
    assert _bad_counts(rows[4]) == {"unreadable_image": 1, "missing_caption": 1, "caption_not_utf8": 1, "truncated": 1}
    assert rows[4]["data/bad_fraction"] == pytest.approx(4 / 32)
    halfway = _expected_bad(own, config, 0, 2 * g)
    assert _bad_counts(rows[2]) == halfway
    assert rows[2]["data/bad_fraction"] == pytest.approx(sum(halfway.values()) / (2 * g))
    assert halfway, "the resume test below needs a bad record in the first half of the epoch"


def test_too_many_bad_records_stop_the_run_with_the_source_named(own, data_dir, first_stage_workdir, tmp_path):
    config = _wds_txt2img_config(own, data_dir, first_stage_workdir)
    config.data.max_bad_fraction = 0.01
    with pytest.raises(ValueError, match=r"webdataset:.*\{00000\.\.00002\}\.tar: \d+ of 16 examples so far .* bad"):
        loop.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.slow  # its own diffusion compile (~25 s); CI trains txt2img and the autoencoder on own data
def test_class_cond_trains_on_class_folders(own, data_dir, first_stage_workdir, tmp_path):
    from configs import class_cond

    from ldm_jax.tasks import build_task

    config = class_cond.get_config("tiny")
    config.data.data_dir = data_dir
    config.first_stage.workdir = first_stage_workdir
    config.data.source = own["classes"]["spec"]
    config.classes = "source"
    config.sample.class_labels = (0, 1, 2)
    config.train.update(num_steps=2, log_every=2)
    task = build_task(config)
    assert task.conditioner.num_classes == 3 and task.conditioner.class_name(1) == "coffee"
    batch = next(iter(pipeline.make_loader(config.data, "train", 8, None, "source")))
    assert batch["label"].shape == (8,) and set(batch["label"].tolist()) <= {0, 1, 2}
    state = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.step) == 2
    assert state.params["unet"]["class_embedding"]["embedding"].shape[0] == 4  # 3 classes + the null class
    rows = _metrics(str(tmp_path / "run"))
    _finite_losses(rows)
    assert rows[2]["data/bad_fraction"] == 0.0 and not _bad_counts(rows[2])
    # A folder without class sub-folders cannot label a class_cond run.
    config.data.source = own["folder"]["spec"]
    with pytest.raises(ValueError, match=r"classes.*names 0 classes; need >= 2"):
        loop.train_and_evaluate(config, str(tmp_path / "unlabelled"))


@pytest.mark.slow  # its own diffusion compile (~25 s); CI trains txt2img and the autoencoder on own data
def test_superres_trains_on_an_image_folder(own, data_dir, first_stage_workdir, tmp_path):
    from configs import superres

    config = superres.get_config("tiny")
    config.data.data_dir = data_dir
    config.first_stage.workdir = first_stage_workdir
    config.data.source = own["folder"]["spec"]
    config.train.update(num_steps=2, log_every=2)
    state = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.step) == 2
    rows = _metrics(str(tmp_path / "run"))
    _finite_losses(rows)
    assert rows[2]["data/bad_fraction"] == 0.0


def _autoencoder_config(source: str, data_dir: str):
    from configs import autoencoder_kl

    config = autoencoder_kl.get_config("tiny")
    config.data.data_dir = data_dir
    config.disc.enabled = False  # as the session's first stage: the same compiled step
    config.data.source = source
    return config


def test_autoencoder_trains_on_an_image_folder(own, data_dir, tmp_path):
    config = _autoencoder_config(own["folder"]["spec"], data_dir)
    config.train.update(num_steps=4, preview_every=4)  # the preview reconstructs the folder's first images
    state = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.step) == 4
    rows = _metrics(str(tmp_path / "run"))
    _finite_losses(rows)
    assert rows[4]["data/bad_fraction"] == 0.0
    assert any(k.startswith("eval/") for k in rows[4])
    assert os.listdir(tmp_path / "run" / "previews")


# --- prepare_data -------------------------------------------------------------------------------------------

_PREPARE_FLAGS = ("--image_size=16", "--records_per_shard=8", "--min_side=12", "--max_aspect=3", "--require_caption")
# Of the webdataset fixture's 32 records, what the flags above drop.
_DROPPED = {
    "unreadable": 2, "missing_image": 0, "missing_caption": 2, "too_small": 1, "aspect_ratio": 1, "duplicate": 0
}  # fmt: skip
_KEPT = 32 - 6


def _prepare(spec: str, out: str, *extra: str):
    proc = run_module("ldm_jax.prepare_data", f"--source={spec}", f"--out={out}", *_PREPARE_FLAGS, *extra, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _files(folder) -> dict[str, bytes]:
    """The files of ``folder`` and of its sub-folders (``hashes/``), by relative path."""
    out = {}
    for n in sorted(os.listdir(folder)):
        path = os.path.join(folder, n)
        if os.path.isdir(path):
            out.update({f"{n}/{k}": v for k, v in _files(path).items()})
        else:
            out[n] = open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def prepared(own, tmp_path_factory):
    """The webdataset fixture prepared by one worker, and by two workers run one after the other."""
    root = tmp_path_factory.mktemp("prepared")
    one, two = str(root / "one"), str(root / "two")
    spec = own["wds"]["spec"]
    first = _prepare(spec, one)
    _prepare(spec, two, "--process_index=0", "--process_count=2")
    after_worker_0 = sorted(os.listdir(two))
    _prepare(spec, two, "--process_index=1", "--process_count=2")
    return {"one": one, "two": two, "stdout": first.stdout, "after_worker_0": after_worker_0}


def test_prepare_data_is_the_same_for_any_worker_count(prepared):
    shard = "shard-{:05d}-of-00004.array_record"
    # Worker 0 of 2 writes shards 0 and 2 (and their statistics), and no dataset_info.json yet.
    assert prepared["after_worker_0"] == sorted(
        [shard.format(j) for j in (0, 2)] + [shard.format(j) + ".json" for j in (0, 2)] + ["settings.json"]
    )
    one, two = _files(prepared["one"]), _files(prepared["two"])
    assert (
        sorted(one)
        == sorted(two)
        == sorted(
            [shard.format(j) for j in range(4)]
            + [shard.format(j) + ".json" for j in range(4)]
            + ["dataset_info.json", "settings.json"]
        )
    )
    for name in one:
        assert one[name] == two[name], name
    info = json.loads(one["dataset_info.json"])
    assert info["records"] == _KEPT and info["source_records"] == 32 and info["shards"] == 4
    assert info["dropped"] == _DROPPED
    assert info["class_names"] == [] and info["settings"]["dedupe"] is False
    assert json.loads(prepared["stdout"].strip().splitlines()[-1])["dropped"] == _DROPPED
    per_shard = [json.loads(one[shard.format(j) + ".json"]) for j in range(4)]
    assert [s["source_records"] for s in per_shard] == [8, 8, 8, 8]
    assert sum(s["records"] for s in per_shard) == _KEPT


def test_prepare_data_rerun_skips_complete_shards_and_redoes_missing_ones(own, prepared, tmp_path):
    import shutil

    out = str(tmp_path / "out")
    shutil.copytree(prepared["one"], out)
    shards = sorted(n for n in os.listdir(out) if n.endswith(".array_record"))
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    _prepare(own["wds"]["spec"], out)
    after = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    assert {n: after[n] for n in shards} == {n: before[n] for n in shards}
    # A shard whose statistics are missing was not finished: it is written again, the same bytes; others untouched.
    os.remove(os.path.join(out, shards[1] + ".json"))
    os.remove(os.path.join(out, shards[1]))
    _prepare(own["wds"]["spec"], out)
    again = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    assert {n: again[n] for n in shards if n != shards[1]} == {n: before[n] for n in shards if n != shards[1]}
    assert _files(out) == _files(prepared["one"])


def test_prepare_data_rerun_with_another_source_is_refused(own, prepared, tmp_path):
    """Shards complete by name are not another source's: the rerun is refused by name, nothing is written."""
    import shutil

    out = str(tmp_path / "out")
    shutil.copytree(prepared["one"], out)
    before = _files(out)
    proc = run_module("ldm_jax.prepare_data", f"--source={own['folder']['spec']}", f"--out={out}", *_PREPARE_FLAGS)
    assert proc.returncode != 0 and "holds shards made with source=" in proc.stderr, proc.stderr[-2000:]
    assert _files(out) == before


def test_recorded_settings_refuse_a_grown_source_and_accept_folders_from_before_the_source_was_recorded(tmp_path):
    from ldm_jax.data import shards

    settings = {"image_size": 16, "source": "folder:/a", "source_records": 10}
    shards.check_settings(str(tmp_path), settings, "shards")
    shards.check_settings(str(tmp_path), settings, "shards")  # a rerun
    with pytest.raises(ValueError, match=r"holds shards made with source_records=10, not 12"):
        shards.check_settings(str(tmp_path), {**settings, "source_records": 12}, "shards")
    # A folder whose settings.json predates the source keys: compared on the rest, so its rerun continues.
    (tmp_path / "settings.json").write_text(json.dumps({"image_size": 16}))
    shards.check_settings(str(tmp_path), settings, "shards")
    with pytest.raises(ValueError, match=r"made with image_size=16, not 32"):
        shards.check_settings(str(tmp_path), {**settings, "image_size": 32}, "shards")


def test_arrayrecord_source_reads_the_shards_its_info_names(own, prepared, tmp_path):
    """Not every *.array_record in the folder (another shard count's stay beside a re-prepared dataset), and not a
    preparation whose dataset_info.json is not written yet."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(prepared["one"], out)
    shutil.copy(out / "shard-00000-of-00004.array_record", out / "shard-00000-of-00002.array_record")
    src = sources.open_source(f"arrayrecord:{out}")
    assert len(src) == _KEPT
    (out / "shard-00003-of-00004.array_record").unlink()
    with pytest.raises(ValueError, match=r"names 4 shards, and 1 are missing \(e\.g\. shard-00003-of-00004"):
        sources.open_source(f"arrayrecord:{out}")
    (out / "dataset_info.json").unlink()
    with pytest.raises(ValueError, match="a preparation without dataset_info.json: not every shard is written"):
        sources.open_source(f"arrayrecord:{out}")


def test_prepare_data_flags_are_checked(own, tmp_path):
    proc = run_module(
        "ldm_jax.prepare_data", f"--source={own['wds']['spec']}", f"--out={tmp_path}", "--process_index=2",
        "--process_count=2",
    )  # fmt: skip
    assert proc.returncode != 0 and "--process_index=2: must be in [0, --process_count=2)" in proc.stderr
    proc = run_module("ldm_jax.prepare_data", f"--source=folder:{tmp_path}/missing", f"--out={tmp_path}/o")
    assert proc.returncode != 0 and "data.source=" in proc.stderr and "no such folder" in proc.stderr
    proc = run_module("ldm_jax.prepare_data", f"--source={own['wds']['spec']}", "--out=gs://bucket/prepared")
    assert proc.returncode != 0 and "--out='gs://bucket/prepared': a URL;" in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(os.path.join(ROOT, "gs:", "bucket", "prepared"))


# A folder of 14 images in 4 shards of 4 source records (--records_per_shard=4), with exact copies within a shard and
# across shards: name -> (what its bytes are, caption or None, the drop reason with --dedupe or "" if kept).
_DUP_FILES = {
    "00_a.jpg": ("a", "astronaut", ""),
    "01_b.png": ("b", "coffee", ""),
    "02_a_copy.jpg": ("a", "astronaut again", "duplicate"),  # same shard as its original
    "03_c_uncaptioned.jpg": ("c", None, "missing_caption"),  # dropped first: claims nothing
    "04_corrupt.jpg": ("corrupt", "broken", "unreadable"),
    "05_corrupt_copy.jpg": ("corrupt", "broken again", "unreadable"),  # another reason comes first
    "06_c.jpg": ("c", "a rocket", ""),  # the first copy of c that is kept
    "07_b_copy.png": ("b", "coffee again", "duplicate"),  # shard 1, its original in shard 0
    "08_a_as_png.png": ("a_png", "astronaut as png", ""),  # the same pixels, other bytes: not caught
    "09_a_copy.jpg": ("a", "astronaut, third copy", "duplicate"),  # shard 2, its original in shard 0
    "10_tiny.jpg": ("tiny", "small", "too_small"),
    "11_tiny_copy.jpg": ("tiny", "small again", "too_small"),
    "12_c_copy.jpg": ("c", "rocket again", "duplicate"),  # shard 3, the kept original (06) in shard 1
    "13_d.jpg": ("d", "a cat", ""),
}
_DEDUPE_FLAGS = ("--records_per_shard=4", "--dedupe")


def _dup_folder(root) -> str:
    a = own_data.photo("astronaut", 0, 150, 220, 20, 20)
    payloads = {
        "a": own_data.encode(a, "JPEG", quality=95),
        "a_png": own_data.encode(a, "PNG"),
        "b": own_data.encode(own_data.photo("coffee", 50, 150, 250, 16, 16), "PNG"),
        "c": own_data.encode(own_data.photo("rocket", 0, 200, 400, 20, 20), "JPEG", quality=95),
        "d": own_data.encode(own_data.photo("chelsea", 40, 120, 200, 24, 16), "JPEG", quality=95),
        "tiny": own_data.encode(own_data.photo("coffee", 0, 0, 300, 8, 8), "JPEG", quality=95),
        "corrupt": b"\xff\xd8\xff\xe0 not a jpeg",
    }
    os.makedirs(root, exist_ok=True)
    for name, (payload, caption, _) in _DUP_FILES.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(payloads[payload])
        if caption is not None:
            with open(os.path.join(root, os.path.splitext(name)[0] + ".txt"), "w") as f:
                f.write(caption)
    return f"folder:{root}"


@pytest.fixture(scope="module")
def deduped(tmp_path_factory):
    """The duplicates folder prepared with --dedupe by one worker, by two workers one after the other (worker 0
    first: it hashes worker 1's shards itself), and by two workers at once (worker 1 first, waiting for the hash
    files of worker 0)."""
    import sys

    from cli import start

    root = tmp_path_factory.mktemp("deduped")
    spec = _dup_folder(str(root / "source"))
    one, seq, par = str(root / "one"), str(root / "seq"), str(root / "par")
    first = _prepare(spec, one, *_DEDUPE_FLAGS)
    w0 = _prepare(spec, seq, *_DEDUPE_FLAGS, "--process_index=0", "--process_count=2", "--wait_seconds=0")
    after_worker_0 = sorted(os.listdir(seq))
    _prepare(spec, seq, *_DEDUPE_FLAGS, "--process_index=1", "--process_count=2", "--wait_seconds=0")
    argv = [sys.executable, "-m", "ldm_jax.prepare_data", f"--source={spec}", f"--out={par}", *_PREPARE_FLAGS]
    worker_1 = start([*argv, *_DEDUPE_FLAGS, "--process_index=1", "--process_count=2"], str(root / "w1.log"))
    hashes = os.path.join(par, "hashes")
    deadline = time.monotonic() + 120
    while not (os.path.isdir(hashes) and len(os.listdir(hashes)) >= 2) and time.monotonic() < deadline:
        time.sleep(0.1)  # worker 1 has hashed its own shards 1 and 3: now worker 0 starts
    assert worker_1.poll() is None, open(worker_1.log).read()[-3000:]
    _prepare(spec, par, *_DEDUPE_FLAGS, "--process_index=0", "--process_count=2")
    assert worker_1.wait(timeout=120) == 0, open(worker_1.log).read()[-3000:]
    return {
        "spec": spec, "one": one, "seq": seq, "par": par, "stdout": first.stdout, "after_worker_0": after_worker_0,
        "worker_0_log": w0.stderr, "worker_1_log": open(worker_1.log).read(),
    }  # fmt: skip


def test_dedupe_keeps_the_first_kept_copy_across_shards(deduped):
    out = deduped["one"]
    expected = {**{r: 0 for r in _DROPPED}, "duplicate": 4, "unreadable": 2, "missing_caption": 1, "too_small": 2}
    assert sum(expected.values()) == 14 - 5
    assert all(sum(r == reason for _, _, r in _DUP_FILES.values()) == n for reason, n in expected.items())
    info = json.load(open(os.path.join(out, "dataset_info.json")))
    assert info["dropped"] == expected and info["settings"]["dedupe"] is True
    assert info["records"] == 5 and info["source_records"] == 14 and info["shards"] == 4
    assert json.loads(deduped["stdout"].strip().splitlines()[-1])["dropped"] == expected
    per_shard = [json.load(open(os.path.join(out, f"shard-{j:05d}-of-00004.array_record.json"))) for j in range(4)]
    assert [s["dropped"]["duplicate"] for s in per_shard] == [1, 1, 1, 1]
    src = sources.open_source(f"arrayrecord:{out}")
    kept = [name for name, (_, _, reason) in _DUP_FILES.items() if not reason]
    assert kept == ["00_a.jpg", "01_b.png", "06_c.jpg", "08_a_as_png.png", "13_d.jpg"]
    assert [src[i]["key"] for i in range(len(src))] == kept  # the first copies, in source order
    # One hash file per shard: a flag byte and a SHA-256 per source record.
    hashes = sorted(os.listdir(os.path.join(out, "hashes")))
    assert hashes == [f"shard-{j:05d}-of-00004.array_record.sha256" for j in range(4)]
    assert [os.path.getsize(os.path.join(out, "hashes", h)) for h in hashes] == [4 * 33, 4 * 33, 4 * 33, 2 * 33]


def test_dedupe_is_the_same_for_any_worker_count_and_order(deduped):
    # Worker 0 alone (--wait_seconds=0) writes its shards 0 and 2 after hashing worker 1's shards 1 (and 3) itself.
    assert [n for n in deduped["after_worker_0"] if n.startswith("shard-")] == sorted(
        f"shard-{j:05d}-of-00004.array_record{ext}" for j in (0, 2) for ext in ("", ".json")
    )
    assert "hashing the source records of shards [1]" in deduped["worker_0_log"]
    # Worker 1, started first, waited for worker 0's hash files instead of hashing its shards.
    assert "waiting up to 600 s" in deduped["worker_1_log"] and "hashing the source" not in deduped["worker_1_log"]
    one = _files(deduped["one"])  # the shards, their statistics, the hash files, dataset_info.json
    assert len(one) == 4 + 4 + 4 + 2
    for other in (deduped["seq"], deduped["par"]):
        assert _files(other) == one


def test_dedupe_rerun_skips_complete_shards_and_checks_the_settings(deduped, tmp_path):
    import shutil

    out = str(tmp_path / "out")
    shutil.copytree(deduped["one"], out)
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if n.startswith("shard-")}
    # Shard 2 (a duplicate of a shard 0 record) killed before it was complete, its hash file lost too.
    victim = "shard-00002-of-00004.array_record"
    for name in (victim, victim + ".json", f"hashes/{victim}.sha256", "dataset_info.json"):
        os.remove(os.path.join(out, name))
    _prepare(deduped["spec"], out, *_DEDUPE_FLAGS)
    after = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if n.startswith("shard-")}
    assert {n: t for n, t in after.items() if not n.startswith(victim)} == {
        n: t for n, t in before.items() if not n.startswith(victim)
    }
    assert _files(out) == _files(deduped["one"])
    # The same folder without --dedupe would keep duplicates next to deduplicated shards: refused.
    proc = run_module("ldm_jax.prepare_data", f"--source={deduped['spec']}", f"--out={out}", *_PREPARE_FLAGS,
                      "--records_per_shard=4")  # fmt: skip
    assert proc.returncode != 0 and "holds shards made with dedupe=True, not False" in proc.stderr


def test_without_dedupe_duplicates_are_kept(deduped, tmp_path):
    out = str(tmp_path / "out")
    _prepare(deduped["spec"], out, "--records_per_shard=4")
    info = json.load(open(os.path.join(out, "dataset_info.json")))
    assert info["records"] == 9 and info["dropped"]["duplicate"] == 0 and info["settings"]["dedupe"] is False
    assert not os.path.exists(os.path.join(out, "hashes"))


def test_prepare_data_keeps_class_labels_of_class_folders(own, tmp_path):
    out = str(tmp_path / "classes")
    proc = run_module(
        "ldm_jax.prepare_data", f"--source={own['classes']['spec']}", f"--out={out}", "--image_size=16",
        "--records_per_shard=5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.load(open(os.path.join(out, "dataset_info.json")))
    assert info["class_names"] == ["cat", "coffee", "rocket"] and info["records"] == 12 and info["shards"] == 3
    src = sources.open_source(f"arrayrecord:{out}")
    assert src.class_names == ["cat", "coffee", "rocket"]
    assert {src[i]["key"]: src[i]["label"] for i in range(len(src))} == own["classes"]["labels"]
    data = _data_config(source=f"arrayrecord:{out}")
    assert pipeline.source_class_names(data) == ["cat", "coffee", "rocket"]


def test_arrayrecord_source_reads_the_prepared_records(own, prepared):
    wds = own["wds"]
    src = sources.open_source(f"arrayrecord:{prepared['one']}")
    assert len(src) == _KEPT and src.class_names == [] and src.info["records"] == _KEPT
    dropped = set(wds["bad"]) | {own_data.WDS_TOO_SMALL, own_data.WDS_TOO_WIDE}
    kept = [k for k in wds["keys"] if k not in dropped]
    records = [src[i] for i in range(len(src))]
    assert [r["key"] for r in records] == kept  # source order, any worker count
    for r in records:
        assert r["error"] == "" and r["captions"] == wds["captions"][r["key"]] and r["label"] == -1
        im = Image.open(io.BytesIO(r["image"]))
        assert im.format == "PNG" and min(im.size) == S  # stored at the shorter side --image_size
    src_examples = preprocess.ExampleSource(src, S, "center", False, 0, ("caption",))
    assert all(int(src_examples[i]["_bad"]) == 0 for i in range(len(src)))


def test_prepared_records_keep_their_original_size(own, prepared):
    wds = own["wds"]
    src = preprocess.ExampleSource(sources.open_source(f"arrayrecord:{prepared['one']}"), S, "center", False, 0)
    for i in range(len(src.raw)):
        key = src.raw[i]["key"]
        assert tuple(src[i]["original_size"]) == tuple(wds["sizes"][key]), key


def test_txt2img_trains_on_prepared_arrayrecord_shards(own, prepared, data_dir, first_stage_workdir, tmp_path):
    config = _wds_txt2img_config(own, data_dir, first_stage_workdir)  # the same step as the webdataset run
    config.data.source = f"arrayrecord:{prepared['two']}"
    state = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.step) == 4
    rows = _metrics(str(tmp_path / "run"))
    _finite_losses(rows)
    assert rows[4]["data/bad_fraction"] == 0.0 and not _bad_counts(rows[4])


# --- resuming on an own source --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wds_txt2img_resumed(own, data_dir, first_stage_workdir, tmp_path_factory):
    """The webdataset txt2img run interrupted while fetching the batch of step 3 (after the step-2 checkpoint),
    then resumed."""
    config = _wds_txt2img_config(own, data_dir, first_stage_workdir)
    workdir = str(tmp_path_factory.mktemp("wds_txt2img_resumed"))
    real_to_global = pipeline.to_global
    calls = {"n": 0}

    def failing_to_global(batch, sharding):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill")
        return real_to_global(batch, sharding)

    pipeline.to_global = failing_to_global
    try:
        with pytest.raises(KeyboardInterrupt):
            loop.train_and_evaluate(copy.deepcopy(config), workdir)
    finally:
        pipeline.to_global = real_to_global
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
    return workdir, loop.train_and_evaluate(copy.deepcopy(config), workdir)


def test_resume_on_own_source_equals_uninterrupted(wds_txt2img_run, wds_txt2img_resumed):
    _, _, full = wds_txt2img_run
    _, resumed = wds_txt2img_resumed
    assert int(resumed.step) == int(full.step) == 4
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(full.ema_params), jax.tree.leaves(resumed.ema_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resumed_run_reports_the_bad_records_of_the_whole_run(wds_txt2img_run, wds_txt2img_resumed):
    _, full_dir, _ = wds_txt2img_run
    resumed_dir, _ = wds_txt2img_resumed
    full, resumed = _metrics(full_dir), _metrics(resumed_dir)
    assert _bad_counts(resumed[4]) == _bad_counts(full[4])
    assert resumed[4]["data/bad_fraction"] == full[4]["data/bad_fraction"]


def test_two_processes_train_on_own_shards_like_one(own, tmp_path):
    """2 processes x 2 devices on the webdataset shards (bad records included) train like one process: the same
    losses and the same bad-record counts, summed over both hosts."""
    import sys

    from cli import two_process_job, wait_all

    from configs import autoencoder_kl

    flags = [
        "--config=configs/autoencoder_kl.py:tiny",
        f"--config.data.source={own['wds']['spec']}",
        "--config.data.max_bad_fraction=0.5",
        "--config.disc.enabled=False",
        "--config.train.num_steps=4",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=4",
    ]
    two = str(tmp_path / "two")
    procs = two_process_job([sys.executable, "-m", "ldm_jax.train", *flags, f"--workdir={two}"], str(tmp_path / "log"))
    outputs = wait_all(procs, timeout=420)
    assert "(2 processes)" in outputs[0]
    config = autoencoder_kl.get_config("tiny")
    config.data.source, config.data.max_bad_fraction = own["wds"]["spec"], 0.5
    config.disc.enabled = False
    config.train.update(num_steps=4, log_every=1, checkpoint_every=4)
    one = str(tmp_path / "one")
    loop.train_and_evaluate(config, one)
    rows_two, rows_one = _metrics(two), _metrics(one)
    assert sorted(rows_two) == sorted(rows_one) == [1, 2, 3, 4]
    for step in rows_one:
        np.testing.assert_allclose(rows_two[step]["train/loss"], rows_one[step]["train/loss"], rtol=1e-5)
        assert _bad_counts(rows_two[step]) == _bad_counts(rows_one[step])
    assert sum(_bad_counts(rows_one[4]).values()) > 0  # the corrupt and truncated samples were met and counted
