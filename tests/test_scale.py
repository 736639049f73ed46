"""Pod-scale mechanics in one process: data order independent of the process count, gradient accumulation, skipped
non-finite steps, FSDP partition specs, learning-rate scaling, and restoring a checkpoint onto another mesh."""

import copy
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from cli import ROOT, xla_flags

from configs import autoencoder_kl
from ldm_jax.data import pipeline
from ldm_jax.tasks import build_task, validate_config
from ldm_jax.training import checkpoint as ckpt_lib
from ldm_jax.training import loop
from ldm_jax.training.optim import peak_learning_rate
from ldm_jax.training.sharding import FSDP_MIN_SIZE, batch_sharding, make_mesh
from ldm_jax.training.state import TrainState
from ldm_jax.training.steps import train_step


class _Records:
    """A source whose example at a position is its record index (sources take the stream position too)."""

    def __len__(self):
        return 100

    def get(self, index, position):
        return index


def test_global_batches_do_not_depend_on_the_process_count():
    source = _Records()
    order = pipeline.GlobalOrder(len(source), 8, seed=3)
    whole = pipeline._ProcessShare(source, order, 0, 30, process_index=0, local=8)
    for processes in (2, 4):
        local = 8 // processes
        shares = [pipeline._ProcessShare(source, order, 0, 30, p, local) for p in range(processes)]
        for step in range(30):  # past the first epoch (12 steps of 8 out of 100 records)
            got = [shares[p][step * local + r] for p in range(processes) for r in range(local)]
            assert got == [whole[step * 8 + r] for r in range(8)], (processes, step)
    # Each epoch visits 96 distinct records in a new order; a loader started at step s continues the stream.
    epoch0 = [whole[i] for i in range(96)]
    epoch1 = [whole[96 + i] for i in range(96)]
    assert len(set(epoch0)) == len(set(epoch1)) == 96 and epoch0 != epoch1
    later = pipeline._ProcessShare(source, order, 5, 10, 0, 8)
    assert [later[i] for i in range(16)] == [whole[40 + i] for i in range(16)]


def _toy_loss(params, frozen, batch, rng):
    pred = jnp.tanh(batch["x"] @ params["w"]) + params["b"]
    loss = jnp.mean(jnp.square(pred - batch["y"]))
    return loss, {"mse": loss}


def _toy_step(tx, accum_steps=1):
    """The shared train step on a deterministic toy loss (so micro-batching changes nothing but the grouping)."""
    return jax.jit(
        lambda s, b: train_step(
            s,
            {},
            b,
            jax.random.key(0),
            loss_fn=_toy_loss,
            tx=tx,
            lr_schedule=optax.constant_schedule(0.1),
            ema_decay=0.9,
            accum_steps=accum_steps,
        )
    )


def _toy(accum_steps, batch, tx):
    step = _toy_step(tx, accum_steps)
    params = {"w": jax.random.normal(jax.random.key(1), (6, 6)) / 3, "b": jnp.zeros((6,))}
    return step(TrainState.create(params, tx), batch)


def test_gradient_accumulation_equals_one_step_on_the_full_batch():
    mesh = make_mesh(-1, 1)
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((32, 6)).astype(np.float32), "y": rng.standard_normal((32, 6)).astype(np.float32)}
    batch = pipeline.to_global(batch, batch_sharding(mesh))
    tx = optax.adam(0.1)
    full, m_full = _toy(1, batch, tx)
    for k in (2, 4):
        acc, m_acc = _toy(k, batch, tx)
        np.testing.assert_allclose(m_acc["train/loss"], m_full["train/loss"], rtol=1e-6)
        np.testing.assert_allclose(m_acc["train/grad_norm"], m_full["train/grad_norm"], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(full.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # With 8 devices a micro-batch of 32 / 8 rows still spans every device: each holds 4 rows, one per micro-batch.
    with pytest.raises(ValueError, match="train.grad_accum_steps=5: must divide the batch"):
        _toy(5, batch, tx)


def test_a_non_finite_step_is_skipped_and_counted():
    rng = np.random.default_rng(0)
    good = {"x": rng.standard_normal((8, 6)).astype(np.float32), "y": rng.standard_normal((8, 6)).astype(np.float32)}
    bad = dict(good, y=np.full((8, 6), np.nan, np.float32))
    tx = optax.adam(0.1)
    step = _toy_step(tx)
    params = {"w": jnp.ones((6, 6)) / 6, "b": jnp.zeros((6,))}
    s0 = TrainState.create(params, tx)
    s1, _ = step(s0, good)
    s2, m2 = step(s1, bad)
    s3, _ = step(s2, bad)
    # Skipped: everything but the step and the counters is exactly the previous state.
    for a, b in zip(
        jax.tree.leaves((s3.params, s3.ema_params, s3.opt_state)),
        jax.tree.leaves((s1.params, s1.ema_params, s1.opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert int(s3.step) == 3 and int(s3.nonfinite_total) == 2 and int(s3.nonfinite_streak) == 2
    assert float(m2["train/nonfinite_skipped"]) == 1
    s4, _ = step(s3, good)
    assert int(s4.nonfinite_streak) == 0 and int(s4.nonfinite_max_streak) == 2 and int(s4.nonfinite_total) == 2
    assert not np.array_equal(s4.params["w"], s3.params["w"])


def _first_stage_config(data_dir, **train):
    c = autoencoder_kl.get_config("tiny")
    c.data.data_dir = data_dir
    c.disc.enabled = False
    c.train.update(train)
    return c


def test_non_finite_streak_stops_the_run_with_a_clear_error(data_dir, tmp_path, monkeypatch):
    """NaN images from step 3 on: each step is skipped and logged, and the third in a row stops the run."""
    config = _first_stage_config(data_dir, num_steps=8, log_every=1, checkpoint_every=100, max_nonfinite_streak=3)
    real = pipeline.to_global
    calls = {"n": 0}

    def poisoned(batch, sharding):
        calls["n"] += 1
        if calls["n"] >= 3:
            batch = dict(
                batch, image=np.full(batch["image"].shape, np.nan, np.float32)
            )  # float images pass as they are
        return real(batch, sharding)

    monkeypatch.setattr(pipeline, "to_global", poisoned)
    workdir = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"3 steps in a row had a non-finite loss.*max_nonfinite_streak=3"):
        loop.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["train/nonfinite_skipped"] for r in rows] == [0, 0, 1, 2, 3]
    assert rows[2]["train/loss"] == "nan"


def test_fsdp_partition_specs_follow_the_rule(data_dir):
    """Parameters, EMA and Adam moments: leaves of at least FSDP_MIN_SIZE elements are split over 'fsdp' along
    their largest dimension that 4 divides (ties: the later dimension); smaller leaves are replicated."""
    config = autoencoder_kl.get_config("demo_f4")
    config.data.data_dir = data_dir
    mesh = make_mesh(2, 4)
    _, _, shardings, abstract = loop.make_train_step(config, build_task(config), mesh)
    checked = 0
    for tree, spec_tree in ((abstract.params, shardings.params), (abstract.ema_params, shardings.ema_params)):
        for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(spec_tree), strict=True):
            spec = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
            if leaf.size < FSDP_MIN_SIZE or not any(d % 4 == 0 for d in leaf.shape):
                assert all(s is None for s in spec), (leaf.shape, spec)
                continue
            best = max(
                i for i, d in enumerate(leaf.shape) if d % 4 == 0 and d == max(x for x in leaf.shape if x % 4 == 0)
            )
            assert spec[best] == "fsdp" and sum(s == "fsdp" for s in spec) == 1, (leaf.shape, spec)
            checked += 1
    assert checked > 0
    # The conv kernels of the widest level (3, 3, 64, 64) split their output channels.
    wide = [
        tuple(sh.spec)
        for leaf, sh in zip(jax.tree.leaves(abstract.params), jax.tree.leaves(shardings.params), strict=True)
        if leaf.shape == (3, 3, 64, 64)
    ]
    assert wide and all(spec == (None, None, None, "fsdp") for spec in wide), wide
    # Adam's moments are sharded like the parameters they belong to.
    param_specs = [s.spec for s in jax.tree.leaves(shardings.params)]
    mu = [s.spec for s in jax.tree.leaves(optax.tree_utils.tree_get(shardings.opt_state, "mu")["model"])]
    assert mu == param_specs


def test_learning_rate_scaling_by_global_batch(tmp_path):
    c = autoencoder_kl.get_config("kl_f8")
    c.data.source = f"folder:{tmp_path}"  # the zoo presets train on the user's images
    assert peak_learning_rate(c.optim, 64) == pytest.approx(4.5e-6 * 64)  # the reference's base_lr x batch
    c.optim.update(lr=1e-4, lr_scaling="sqrt", base_batch_size=256)
    assert peak_learning_rate(c.optim, 1024) == pytest.approx(2e-4)
    c.optim.lr_scaling = "none"
    assert peak_learning_rate(c.optim, 1024) == pytest.approx(1e-4)
    c.optim.lr_scaling = "cubic"
    c.loss.perceptual_weight = 0.0
    with pytest.raises(ValueError, match="optim.lr_scaling='cubic'"):
        validate_config(c)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("train.grad_accum_steps", 3, "train.grad_accum_steps=3: must divide data.global_batch_size=8"),
        ("train.max_nonfinite_streak", 0, "train.max_nonfinite_streak=0"),
    ],
)
def test_scale_fields_are_checked(field, value, match):
    c = autoencoder_kl.get_config("tiny")
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=match):
        validate_config(c)


def test_first_stage_accumulates_gradients():
    """The adversarial first stage takes train.grad_accum_steps like every task (tests/test_step_core.py checks that
    k micro-batches give the full batch's update)."""
    c = autoencoder_kl.get_config("tiny")
    c.train.grad_accum_steps = 2
    validate_config(c)
    _, step = build_task(c).make_step(c.train.num_steps)
    assert step.keywords["accum_steps"] == 2


_RESTORE_ON_ONE_DEVICE = """
import sys, numpy as np, jax
from configs import autoencoder_kl
from ldm_jax import config_lib, jax_setup
from ldm_jax.tasks import build_task
from ldm_jax.training import checkpoint as ckpt_lib, loop
from ldm_jax.training.sharding import make_mesh
jax_setup.configure()
workdir, expected = sys.argv[1], np.load(sys.argv[2])
config = config_lib.load_config(workdir + "/config.json")
mesh = make_mesh(-1, 1)
assert mesh.size == 1
_, _, shardings, abstract = loop.make_train_step(config, build_task(config), mesh)
ckpt = ckpt_lib.Checkpointer(workdir, 3)
state, _ = ckpt.restore(ckpt.latest_step(), ckpt_lib.abstract_with_shardings(abstract, shardings))
leaves = jax.tree.leaves(state)
assert len(leaves) == len(expected.files)
for i, leaf in enumerate(leaves):
    np.testing.assert_array_equal(np.asarray(leaf), expected[f"a{i}"])
print("restored", len(leaves), "arrays on", jax.device_count(), "device")
"""


def test_checkpoint_of_8_devices_restores_on_1_device_and_on_a_2x4_mesh(data_dir, tmp_path):
    config = _first_stage_config(data_dir, num_steps=2, checkpoint_every=2)
    config.model.block_out_channels = (8, 16, 128)  # a 128x128 level: kernels large enough for FSDP to split
    workdir = str(tmp_path / "run")
    state = loop.train_and_evaluate(config, workdir)
    saved = [np.asarray(x) for x in jax.tree.leaves(state)]
    np.savez(tmp_path / "saved.npz", **{f"a{i}": x for i, x in enumerate(saved)})
    # 1 device, in a fresh process.
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    proc = subprocess.run(
        [sys.executable, "-c", _RESTORE_ON_ONE_DEVICE, workdir, str(tmp_path / "saved.npz")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "restored" in proc.stdout, proc.stderr[-3000:]
    # A (data 2, fsdp 4) mesh here: the same values, now split over 'fsdp', and training continues from them.
    resumed = copy.deepcopy(config)
    resumed.mesh.update(data=2, fsdp=4)
    mesh = make_mesh(2, 4)
    _, _, shardings, abstract = loop.make_train_step(resumed, build_task(resumed), mesh)
    ckpt = ckpt_lib.Checkpointer(workdir, 3)
    restored, _ = ckpt.restore(2, ckpt_lib.abstract_with_shardings(abstract, shardings))
    ckpt.close()
    for a, b in zip(jax.tree.leaves(restored), saved, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert any("fsdp" in tuple(x.sharding.spec) for x in jax.tree.leaves(restored.params))
    for x, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
        assert x.sharding == sh
    resumed.train.num_steps = 3
    final = loop.train_and_evaluate(resumed, workdir)
    assert int(final.step) == 3
