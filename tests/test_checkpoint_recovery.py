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

from ldm_jax import config_lib
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


def test_when_no_checkpoint_restores_none_is_moved_aside(eight_steps, data_dir, tmp_path):
    """Every checkpoint failing at once points at the machine (memory, permissions, storage) more than at every
    file: the run stops naming them and moves nothing, so the same command resumes once the cause is fixed
    (moved aside, they left an empty checkpoints folder, and the rerun trained from step 0)."""
    work = str(tmp_path / "all_damaged")
    shutil.copytree(eight_steps, work)
    for step in ("4", "6", "8"):
        damage_checkpoint(os.path.join(work, "checkpoints", step))
    with pytest.raises(ckpt_lib.CheckpointUnreadable, match=r"no checkpoint restores \(tried \[8, 6, 4\]"):
        train_and_evaluate(_config(data_dir, 10), work)
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["4", "6", "8"]


def test_a_machine_failure_moves_nothing_and_tries_no_older_checkpoint(eight_steps, data_dir, tmp_path, monkeypatch):
    """Out of memory (or permissions, file handles) while the newest checkpoint restores is the machine's failure,
    not the files': were an older one tried and restored, the newest would be moved aside as damaged and the run
    would redo its steps. The run stops instead, naming the cause, and every checkpoint stays where it was."""
    work = str(tmp_path / "machine")
    shutil.copytree(eight_steps, work)
    real_restore = ckpt_lib.Checkpointer.restore
    tried = []

    def restore(self, step, abstract):
        tried.append(step)
        if step == 8:
            try:  # as tensorstore reports it through Orbax: the allocation error under another type
                raise MemoryError("cannot allocate 3.2 GiB")
            except MemoryError as e:
                raise ValueError("Error reading array 'params.unet'") from e
        return real_restore(self, step, abstract)

    monkeypatch.setattr(ckpt_lib.Checkpointer, "restore", restore)
    with pytest.raises(
        ckpt_lib.CheckpointUnreadable, match=r"/8 does not restore on this machine .*no checkpoint was moved"
    ):
        train_and_evaluate(_config(data_dir, 10), work)
    assert tried == [8] and sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["4", "6", "8"]
    assert ckpt_lib.machine_failure(OSError(12, "Cannot allocate memory"))
    assert ckpt_lib.machine_failure(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
    assert not ckpt_lib.machine_failure(ValueError("zstd decompression failed: corrupted block"))


def test_bits_changed_inside_an_array_are_caught_by_the_checksums(eight_steps, data_dir, tmp_path):
    """Bit rot inside an array's stored bytes can restore without any error from Orbax (tensorstore keeps
    incompressible float chunks as raw zstd blocks, without a checksum): the per-leaf checksums saved with each
    checkpoint catch it. One flipped bit in one leaf changes that leaf's checksum and no other; a checkpoint whose
    arrays do not match its saved checksums counts as damaged, named by leaf."""
    from ldm_jax.training import checksums

    ckpt = ckpt_lib.Checkpointer(eight_steps, 3)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), ckpt.manager.item_metadata(8)["state"]
    )
    state, meta = ckpt.restore(8, abstract)
    ckpt.close()
    saved = meta[ckpt_lib.CHECKSUMS]
    names = list(checksums.of_tree(state))  # in the tree's leaf order (the saved JSON's keys are sorted)
    assert checksums.of_tree(state) == saved and len(saved) == len(jax.tree.leaves(state))

    # One bit of one element (a sign bit: the high bit, the hardest for a sum to see) of one leaf, on the host.
    leaves, treedef = jax.tree.flatten(jax.device_get(state))
    i = max(range(len(leaves)), key=lambda k: np.size(leaves[k]))
    bad = np.array(leaves[i])
    bad.reshape(-1).view(np.uint32)[np.size(bad) // 2] ^= np.uint32(1 << 31)
    changed = checksums.of_tree(jax.tree.unflatten(treedef, leaves[:i] + [bad] + leaves[i + 1 :]))
    assert [n for n in names if changed[n] != saved[n]] == [names[i]]

    # The run: the checkpoint's data no longer matches its checksums (here the saved value of that leaf is what
    # differs, which the check cannot tell from the data differing).
    work = str(tmp_path / "bitrot")
    shutil.copytree(eight_steps, work)
    meta_file = os.path.join(work, "checkpoints", "8", "meta", "metadata")
    with open(meta_file) as f:
        stored = json.load(f)
    stored[ckpt_lib.CHECKSUMS][names[i]] = changed[names[i]]
    with open(meta_file, "w") as f:
        json.dump(stored, f)
    c = _config(data_dir, 10)
    c.train.on_corrupt_checkpoint = "fail"
    with pytest.raises(
        ckpt_lib.CheckpointUnreadable,
        match=r"checkpoints/8 does not restore \(its arrays differ from what was saved: " + re.escape(names[i]),
    ):
        train_and_evaluate(c, work)


def test_checkpoint_of_another_model_is_named_not_restored(eight_steps, data_dir, tmp_path):
    work = str(tmp_path / "other")
    shutil.copytree(eight_steps, work)
    c = _config(data_dir, 10)
    c.model.block_out_channels = (16, 32)
    # The config check names the field first (training/resume_config.py) ...
    with pytest.raises(config_lib.ConfigError, match=r"model\.block_out_channels \[.+\] -> \[16, 32\]"):
        train_and_evaluate(c, work)
    # ... and a change allowed on purpose still cannot restore arrays of another shape: named, nothing moved.
    with pytest.raises(
        ckpt_lib.CheckpointTreeMismatch,
        match=r"checkpoints/8: .*params\..* is \(.+\) in the checkpoint and \(.+\) in this config",
    ):
        train_and_evaluate(c, work, allow_config_change=True)
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


def test_saving_a_replicated_state_on_8_cpu_devices_compiles_nothing(tmp_path, caplog):
    """On CPU every replicated array is written whole by its first replica. Orbax's replica-parallel default split
    each one into a slice per device, a ``jit(slice)`` compile per array shape and device (about 300 at the first
    save of a tiny run, 7 s, in every new process) for no gain where the devices share the host's memory."""
    import logging

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ldm_jax.training.sharding import make_mesh

    mesh = make_mesh()
    assert mesh.size == 8
    shardings = {f"w{n}": NamedSharding(mesh, P()) for n in (3, 5, 7, 16)}
    state = {k: jax.device_put(np.arange(int(k[1:]) * 4, dtype=np.float32), s) for k, s in shardings.items()}
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), 2, async_save=False)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        ckpt.save(1, state, {"note": "x"}, checksum=False)
        ckpt.wait()
    compiled = [r.getMessage()[:80] for r in caplog.records if r.getMessage().startswith("Compiling ")]
    assert compiled == [], compiled
    restored, meta = ckpt.restore(1, ckpt_lib.abstract_with_shardings(state, shardings))
    ckpt.close()
    assert meta == {"note": "x"}
    for k, v in state.items():
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(v))
        assert restored[k].sharding.is_equivalent_to(shardings[k], 1)
