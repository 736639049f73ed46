import copy

import jax
import numpy as np
import pytest

from ldm_jax.data import pipeline
from ldm_jax.tasks import build_task
from ldm_jax.training import loop
from ldm_jax.training.sharding import batch_sharding, make_mesh, replicated


def _fixed_batch(config, task):
    loader = pipeline.make_loader(config.data, "train", config.data.global_batch_size, task.tokenizer)
    return next(iter(loader))


def _params_close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def _run_steps(config, task, frozen, batch, mesh, n, key=1):
    init_state, step_fn, shardings, _ = loop.make_train_step(config, task, mesh)
    state = jax.jit(init_state, out_shardings=shardings)(jax.random.key(0))
    frozen = jax.device_put(frozen, replicated(mesh))
    gbatch = pipeline.to_global(batch, batch_sharding(mesh))
    losses = []
    for _ in range(n):
        state, metrics = step_fn(state, frozen, gbatch, jax.random.key(key))
        losses.append(float(metrics["train/loss"]))
    return state, losses


def test_one_step_on_8_devices_equals_1_device(txt2img_config):
    task = build_task(txt2img_config)
    frozen, _ = task.setup({})
    batch = _fixed_batch(txt2img_config, task)
    one, loss1 = _run_steps(txt2img_config, task, frozen, batch, make_mesh(devices=jax.devices()[:1]), 1)
    eight, loss8 = _run_steps(txt2img_config, task, frozen, batch, make_mesh(-1, 1), 1)
    assert make_mesh(-1, 1).size == 8
    np.testing.assert_allclose(loss1, loss8, rtol=1e-5)
    _params_close(one.params, eight.params, rtol=1e-4, atol=1e-6)
    _params_close(one.ema_params, eight.ema_params, rtol=1e-4, atol=1e-6)
    # FSDP (parameters split over 'fsdp') computes the same step as pure data parallelism.
    fsdp, loss_f = _run_steps(txt2img_config, task, frozen, batch, make_mesh(2, 4), 1)
    np.testing.assert_allclose(loss_f, loss8, rtol=1e-5)
    _params_close(fsdp.params, eight.params, rtol=1e-4, atol=1e-6)
    specs = {leaf.sharding.spec for leaf in jax.tree.leaves(fsdp.params)}
    assert any("fsdp" in s for s in specs)


def test_loss_falls_when_overfitting_one_batch(txt2img_config):
    config = copy.deepcopy(txt2img_config)
    config.optim.lr = 3e-3
    config.diffusion.cond_drop_prob = 0.0
    task = build_task(config)
    frozen, _ = task.setup({})
    batch = _fixed_batch(config, task)
    mesh = make_mesh(-1, 1)
    state, _ = _run_steps(config, task, frozen, batch, mesh, 60)
    # Same timesteps and noise before and after: only the parameters differ.
    gbatch = pipeline.to_global(batch, batch_sharding(mesh))
    frozen_d = jax.device_put(frozen, replicated(mesh))
    init_state, _, _, _ = loop.make_train_step(config, task, mesh)
    fresh = init_state(jax.random.key(0))
    eval_loss = jax.jit(lambda p, k: task.loss_fn(p, frozen_d, gbatch, k)[0])
    keys = [jax.random.key(100 + i) for i in range(8)]
    before = np.mean([float(eval_loss(fresh.params, k)) for k in keys])
    after = np.mean([float(eval_loss(state.params, k)) for k in keys])
    assert after < 0.6 * before, (before, after)


def test_resume_equals_uninterrupted_and_step_traced_once(txt2img_config, tmp_path, monkeypatch):
    from ldm_jax.tasks import latent_diffusion

    traces = []
    real_step = latent_diffusion.train_step

    def counting_step(*args, **kwargs):
        traces.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(latent_diffusion, "train_step", counting_step)
    config = copy.deepcopy(txt2img_config)
    config.train.num_steps = 8
    config.train.checkpoint_every = 3
    full = loop.train_and_evaluate(config, str(tmp_path / "full"))
    assert len(traces) == 1, "the train step must be traced exactly once for the whole run"

    # Interrupted run: the data pipeline dies while fetching the batch of step 6 (after the step-3 checkpoint).
    real_to_global = pipeline.to_global
    calls = {"n": 0}

    def failing_to_global(batch, sharding):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("simulated kill")
        return real_to_global(batch, sharding)

    monkeypatch.setattr(pipeline, "to_global", failing_to_global)
    with pytest.raises(KeyboardInterrupt):
        loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(pipeline, "to_global", real_to_global)
    resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert int(resumed.step) == int(full.step) == 8
    # Bit-identical on CPU: same data order (restored iterator) and same per-step randomness (fold_in(step)).
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(full.ema_params), jax.tree.leaves(resumed.ema_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_autoencoder_loss_falls_on_one_batch(data_dir):
    from configs import autoencoder_kl

    config = autoencoder_kl.get_config("tiny")
    config.data.data_dir = data_dir
    config.optim.lr = 3e-3
    config.disc.enabled = False  # the reconstruction objective alone; the GAN is tested in test_first_stage
    task = build_task(config)
    loader = pipeline.make_loader(config.data, "train", config.data.global_batch_size)
    batch = next(iter(loader))
    _, losses = _run_steps(config, task, {}, batch, make_mesh(-1, 1), 40)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses


def test_a_profile_that_cannot_be_published_is_kept_and_training_goes_on(tmp_path, caplog):
    """train.profile_steps is diagnostics: a trace that cannot be written into the workdir (here a file stands where
    its folder goes) is logged with the local folder that keeps it, and the loop is not stopped."""
    import logging
    import os

    from ldm_jax.training.profiling import StepProfiler

    (tmp_path / "tensorboard").write_text("not a folder")
    profiler = StepProfiler(str(tmp_path), first_step=10, skip=1, num=1)
    f = jax.jit(lambda x: x @ x)
    x = jax.numpy.ones((8, 8))
    with caplog.at_level(logging.ERROR):
        for step in range(10, 13):
            profiler.before_step(step)
            with profiler.annotate(step):
                y = f(x)
            profiler.after_step(step + 1, y)
    assert not profiler.active
    (message,) = [r.getMessage() for r in caplog.records if "not published" in r.getMessage()]
    assert message.startswith("profile of steps 12-12 not published")
    kept = message.rsplit("the trace is kept in ", 1)[1]
    assert any(name.endswith(".xplane.pb") for _, _, names in os.walk(kept) for name in names)
