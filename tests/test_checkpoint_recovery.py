"""Long-run reliability of checkpoints: a damaged newest checkpoint is moved aside and the run resumes from the
newest one that restores (bit-identical to restoring that step on purpose), a checkpoint that does not fit the
config is named, not restored, and retention keeps the last N plus every K-th step."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from damage import damage_checkpoint

from ldm_jax.training import checkpoint as ckpt_lib
from ldm_jax.training.loop import train_and_evaluate


def _config(data_dir, num_steps):
    from configs import autoencoder_kl

    c = autoencoder_kl.get_config("tiny")
    c.data.data_dir = data_dir
    c.disc.enabled = False
    # Saves at 2, 4, 6, 8: the last two (6, 8) are kept, and every multiple of 4 (4, 8).
    c.train.update(num_steps=num_steps, log_every=2, checkpoint_every=2, keep_checkpoints=2, keep_every=4)
    c.train.async_checkpointing = False
    return c


def _params(workdir):
    params, _, step = ckpt_lib.load_trained_params(workdir, "params")
    return step, jax.device_get(params)


@pytest.fixture(scope="module")
def eight_steps(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("recovery") / "run")
    train_and_evaluate(_config(data_dir, 8), workdir)
    return workdir


def test_retention_keeps_the_last_and_every_kth(eight_steps):
    names = sorted(os.listdir(os.path.join(eight_steps, "checkpoints")), key=lambda n: int(n))
    assert names == ["4", "6", "8"]


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(eight_steps, data_dir, tmp_path):
    work, on_purpose = str(tmp_path / "damaged"), str(tmp_path / "on_purpose")
    shutil.copytree(eight_steps, work)
    shutil.copytree(eight_steps, on_purpose)
    damage_checkpoint(os.path.join(work, "checkpoints", "8"))

    # "fail": stops naming the step, moves nothing.
    c = _config(data_dir, 10)
    c.train.on_corrupt_checkpoint = "fail"
    with pytest.raises(ckpt_lib.CheckpointUnreadable, match=r"checkpoints/8 does not restore \(.+\)"):
        train_and_evaluate(c, work)
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["4", "6", "8"]

    # "fallback" (the default): step 8 moved aside and kept, the run resumes from 6 and goes on to 10.
    train_and_evaluate(_config(data_dir, 10), work)
    names = os.listdir(os.path.join(work, "checkpoints"))
    corrupt = [n for n in names if n.startswith("8.corrupt-")]
    assert len(corrupt) == 1 and os.listdir(os.path.join(work, "checkpoints", corrupt[0], "state"))
    with open(os.path.join(work, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    fallback = [r for r in rows if "checkpoint/fallback_from_step" in r]
    assert len(fallback) == 1 and fallback[0]["step"] == 6 and fallback[0]["checkpoint/fallback_from_step"] == 8
    print(f"damaged checkpoint detected and fallen back from in {fallback[0]['checkpoint/restore_seconds']:.2f} s")

    # The same as restoring step 6 on purpose (the newer checkpoint is moved aside, unused) and training to 10.
    c = _config(data_dir, 10)
    c.train.restore_step = 6
    train_and_evaluate(c, on_purpose)
    assert any(n.startswith("8.unused-") for n in os.listdir(os.path.join(on_purpose, "checkpoints")))
    (s1, p1), (s2, p2) = _params(work), _params(on_purpose)
    assert s1 == s2 == 10
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bytes_flipped_inside_an_array_are_caught_by_the_checksums(eight_steps, data_dir, tmp_path):
    """Bit rot inside an array's stored bytes (tensorstore keeps incompressible float chunks as raw zstd blocks,
    without a checksum) restores without any error from Orbax; the per-leaf checksums saved with the checkpoint
    catch it, naming the leaf, and the run treats the checkpoint as damaged."""
    from ldm_jax.training import checksums

    work = str(tmp_path / "bitrot")
    shutil.copytree(eight_steps, work)
    state_dir = os.path.join(work, "checkpoints", "8", "state")
    target = max((os.path.join(d, n) for d, _, names in os.walk(state_dir) for n in names), key=os.path.getsize)
    ckpt = ckpt_lib.Checkpointer(work, 3)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), ckpt.manager.item_metadata(8)["state"]
    )
    size = os.path.getsize(target)

    def flip(at: int) -> None:
        with open(target, "r+b") as f:  # four bytes, one bit each
            f.seek(at)
            data = f.read(4)
            f.seek(at)
            f.write(bytes(b ^ 0x10 for b in data))

    # A flip that lands in a compressed chunk's framing fails to decode (the case the other test covers); one that
    # lands in a raw block restores without any error. Find such a spot, as bit rot would.
    for at in [size * k // 16 for k in (8, 4, 12, 2, 6, 10, 14, 1, 3, 5, 7, 9, 11, 13, 15)]:
        flip(at)
        try:
            state, meta = ckpt.restore(8, abstract)  # no error from the storage layer...
        except Exception:
            flip(at)  # undo
            continue
        mismatch = checksums.first_mismatch(state, meta[ckpt_lib.CHECKSUMS])  # ...but the checksums see it
        if mismatch:
            break
        flip(at)  # bytes that hold no array value (unchanged arrays): undo
    else:
        pytest.fail("no flip restored silently with changed values: nothing for the checksums to catch")
    ckpt.close()
    assert "checksum" in mismatch, mismatch
    intact = ckpt_lib.Checkpointer(eight_steps, 3)
    assert intact.restore_meta(8)[ckpt_lib.CHECKSUMS] == meta[ckpt_lib.CHECKSUMS]
    intact.close()

    c = _config(data_dir, 10)
    c.train.on_corrupt_checkpoint = "fail"
    leaf = mismatch.split(":")[0]
    with pytest.raises(
        ckpt_lib.CheckpointUnreadable,
        match=r"checkpoints/8 does not restore \(its arrays differ from what was saved: " + re.escape(leaf),
    ):
        train_and_evaluate(c, work)


def test_checkpoint_of_another_model_is_named_not_restored(eight_steps, data_dir, tmp_path):
    work = str(tmp_path / "other")
    shutil.copytree(eight_steps, work)
    c = _config(data_dir, 10)
    c.model.block_out_channels = (16, 32)
    with pytest.raises(
        ckpt_lib.CheckpointTreeMismatch,
        match=r"checkpoints/8: .*params\..* is \(.+\) in the checkpoint and \(.+\) in this config",
    ):
        train_and_evaluate(c, work)
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["4", "6", "8"]  # nothing moved
    c = _config(data_dir, 10)
    c.train.restore_step = 5
    with pytest.raises(
        ckpt_lib.CheckpointUnreadable, match=r"restore_step=5: .* has no such checkpoint \(it has \[4, 6, 8\]\)"
    ):
        train_and_evaluate(c, work)


def test_a_failed_save_names_the_folder_and_keeps_the_earlier_checkpoints(data_dir, tmp_path, monkeypatch):
    """A save that fails (here: the disk fills up at step 4) stops the run with the folder's name; step 2 stays
    intact and restores."""
    import errno

    import orbax.checkpoint as ocp

    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    workdir = str(tmp_path / "full")
    with pytest.raises(
        ckpt_lib.CheckpointSaveFailed,
        match=r"saving checkpoint 4 to .*/full/checkpoints failed \(OSError: .*No space left.*\(\[2\]\) are intact",
    ):
        train_and_evaluate(_config(data_dir, 4), workdir)
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    step, _ = _params(workdir)
    assert step == 2
