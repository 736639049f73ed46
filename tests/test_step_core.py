"""The step core both train steps share (``training.steps.accumulate`` and ``finish_step``): micro-batch order and
randomness, and the adversarial first-stage step with gradient accumulation, which must equal the full-batch step
(adaptive weight from the full batch's gradients, EMA codebook from the whole batch) when the discriminator has no
batch statistics. The diffusion step's accumulation is checked in test_scale.py."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import autoencoder_kl, autoencoder_vq
from ldm_jax.models.autoencoder import DiagonalGaussian
from ldm_jax.tasks import build_task
from ldm_jax.training import gan
from ldm_jax.training.state import TrainState
from ldm_jax.training.steps import accumulate, train_step

COUNTERS = ("step", "nonfinite_total", "nonfinite_streak", "nonfinite_max_streak")


def test_accumulate_orders_rows_and_draws_one_key_per_micro_batch():
    x = jnp.arange(12.0).reshape(6, 2)
    rng = jax.random.key(5)

    def fn(b, r):
        noise = jax.random.uniform(r, ())
        return {"g": jnp.sum(b["x"], axis=0)}, {"noise": noise, "mean": jnp.mean(b["x"])}, {"x": b["x"] + 0 * noise}

    grads, values, rows = accumulate(fn, {"x": x}, rng, 3, {"g": jnp.zeros(2)})
    # Micro-batch i held rows i, i + 3: the rows come back in the batch's order, the sums and means are the batch's.
    np.testing.assert_array_equal(rows["x"], x)
    np.testing.assert_allclose(grads["g"], jnp.sum(x, axis=0) / 3)
    np.testing.assert_allclose(values["mean"], jnp.mean(x), rtol=1e-6)
    draws = [jax.random.uniform(jax.random.fold_in(rng, i), ()) for i in range(3)]
    np.testing.assert_allclose(values["noise"], np.mean(draws), rtol=1e-6)
    # Without accumulation: fn on the whole batch with the key itself.
    assert float(accumulate(fn, {"x": x}, rng, 1, None)[1]["noise"]) == float(jax.random.uniform(rng, ()))
    with pytest.raises(ValueError, match="train.grad_accum_steps=4: must divide the batch"):
        accumulate(fn, {"x": x}, rng, 4, {"g": jnp.zeros(2)})


def test_accumulated_diffusion_step_skips_a_batch_with_one_bad_row():
    def loss_fn(params, frozen, batch, rng):
        loss = jnp.mean(jnp.square(batch["x"] @ params["w"] - batch["y"]))
        return loss, {"mse": loss}

    tx = optax.adam(0.1)
    step = jax.jit(
        functools.partial(
            train_step, loss_fn=loss_fn, tx=tx, lr_schedule=optax.constant_schedule(0.1), ema_decay=0.9, accum_steps=2
        )
    )
    rng = np.random.default_rng(0)
    good = {"x": rng.standard_normal((8, 4)).astype(np.float32), "y": rng.standard_normal((8, 4)).astype(np.float32)}
    bad = {"x": good["x"].copy(), "y": good["y"].copy()}
    bad["y"][5, 1] = np.nan  # one row of the second micro-batch
    s0 = TrainState.create({"w": jnp.eye(4)}, tx)
    s1, _ = step(s0, {}, good, jax.random.key(0))
    s2, m2 = step(s1, {}, bad, jax.random.key(0))
    _assert_skipped(s1, s2)
    assert int(m2["train/nonfinite_skipped"]) == 1


def _assert_skipped(before, after):
    for name in type(before).__dataclass_fields__:
        if name not in COUNTERS:
            for a, b in zip(jax.tree.leaves(getattr(after, name)), jax.tree.leaves(getattr(before, name)), strict=True):
                np.testing.assert_array_equal(a, b, err_msg=name)
    assert int(after.step) == int(before.step) + 1
    assert int(after.nonfinite_total) == int(before.nonfinite_total) + 1 and int(after.nonfinite_streak) == 1


@pytest.fixture(scope="module")
def deterministic_posterior():
    """KL posterior samples replaced by the posterior mean: the full batch and its micro-batches draw different
    noise (``fold_in(rng, i)``), so only a noise-free loss can be compared across accumulation steps."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DiagonalGaussian, "sample", lambda self, rng: self.mode())
        yield


def _images(n=8, seed=0):
    """Random images at odd rows, near-black ones at even rows: the two micro-batches of 2 (even and odd rows)
    differ, so a micro-batch's own statistics (its adaptive weight, say) would not be the full batch's."""
    x = jax.random.uniform(jax.random.key(seed), (n, 16, 16, 3), minval=-1.0, maxval=1.0)
    return {"image": jnp.where((jnp.arange(n) % 2 == 1)[:, None, None, None], x, -0.9)}


_STEPS = {}


def _gan(kind, norm, accum_steps):
    """(initial state, jitted step) of the tiny first stage with the GAN on from step 0 and plain SGD (lr 1) for
    both players, so an update is minus the gradient; cached, so tests share compiled steps."""
    key = (kind, norm, accum_steps)
    if key not in _STEPS:
        c = (autoencoder_kl if kind == "kl" else autoencoder_vq).get_config("tiny")
        c.disc.update(start=0, norm=norm)
        if kind == "kl":
            # nll scaled down by exp(-5) keeps the adaptive weight under its clip, where it sits at init with
            # log-variance 0: a clipped weight would hide a wrongly computed one.
            c.loss.logvar_init = 5.0
        if kind == "vq_ema":
            c.loss.codebook_update = "ema"
        task = build_task(c)
        tx = optax.sgd(1.0)
        step = functools.partial(task.gan_step(tx, tx, optax.constant_schedule(1.0)), accum_steps=accum_steps)
        _STEPS[key] = (task.init_state(jax.random.key(0), tx, tx), jax.jit(step))
    return _STEPS[key]


def _assert_trees_close(got, want, rtol, name):
    """Leaf-wise closeness relative to the leaf's largest magnitude, or a thousandth of the tree's where that is
    more: parameter updates span orders of magnitude, and some are float noise (an attention key's bias has zero
    gradient; an update of a parameter near 1 is resolved to its ULP)."""
    tree_scale = max((float(np.max(np.abs(b))) for b in jax.tree.leaves(want)), default=0.0)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        atol = rtol * max(float(np.max(np.abs(b))), 1e-3 * tree_scale, 1e-12)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name + jax.tree_util.keystr(path))


@pytest.mark.parametrize("kind", ["kl", "vq_ema"])
def test_accumulated_gan_step_equals_the_full_batch_step(kind, deterministic_posterior):
    state, full_step = _gan(kind, "none", 1)
    _, acc_step = _gan(kind, "none", 2)
    batch, rng = _images(), jax.random.key(3)
    full, m_full = full_step(state, {}, batch, rng)
    acc, m_acc = acc_step(state, {}, batch, rng)
    # Not clipped: a micro-batch's own adaptive weight would differ by about 10% here.
    assert 0 < float(m_full["train/d_weight"]) < 0.5 * gan.ADAPTIVE_WEIGHT_MAX
    assert float(m_full["train/disc_loss"]) > 0
    # Every metric but the codebook perplexity (a micro-batch statistic; see training/gan.py) is a batch mean or
    # computed from the full batch's gradients, d_weight included.
    for k in m_full:
        if k != "train/perplexity":
            np.testing.assert_allclose(m_acc[k], m_full[k], rtol=2e-5, err_msg=k)
    # Generator, learned log-variance, discriminator, EMA codebook statistics: the updates (minus the gradients).
    d_acc, d_full = (jax.tree.map(jnp.subtract, s, state) for s in (acc, full))
    for name in ("params", "loss_params", "disc_params", "model_state", "ema_params"):
        _assert_trees_close(getattr(d_acc, name), getattr(d_full, name), 1e-4, name)
    if kind == "vq_ema":
        # The codes are the EMA statistics' means, from every latent of the batch, not a micro-batch's.
        assert not np.allclose(full.model_state["cluster_size"], state.model_state["cluster_size"])


def test_accumulated_gan_step_with_batch_norm_discriminator_runs(deterministic_posterior):
    """Batch statistics per micro-batch: not the full-batch step, but a finite one that trains both players."""
    state, step = _gan("kl", "batch", 2)
    new, m = step(state, {}, _images(), jax.random.key(3))
    for k, v in m.items():
        assert np.isfinite(v), k
    assert float(m["train/d_weight"]) > 0 and int(new.nonfinite_total) == 0
    for name in ("params", "disc_params"):
        now, before = (jax.tree.leaves(getattr(s, name)) for s in (new, state))
        assert (
            max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(now, before, strict=True)) > 0
        ), name


def test_accumulated_gan_step_skips_a_batch_with_one_bad_row(deterministic_posterior):
    state, step = _gan("kl", "none", 2)
    batch = _images()
    bad = {"image": batch["image"].at[6, 3, 3, 0].set(jnp.nan)}  # a row of the first micro-batch
    rng = jax.random.key(3)
    skipped, m = step(state, {}, bad, rng)
    _assert_skipped(state, skipped)
    assert int(m["train/nonfinite_skipped"]) == 1
    # The next finite step updates as usual and ends the streak.
    after, _ = step(skipped, {}, batch, rng)
    assert int(after.nonfinite_streak) == 0 and int(after.nonfinite_total) == 1
    moved, before = after.params["decoder"]["conv_out"]["kernel"], skipped.params["decoder"]["conv_out"]["kernel"]
    assert np.all(np.isfinite(moved)) and not np.array_equal(moved, before)


def _gradient_tree(scale: float) -> dict:
    keys = iter(jax.random.split(jax.random.key(3), 64))
    shapes = [(3, 3, 8, 16), (16,), (16, 32), (32,), (7,), (2, 5, 5)] * 8
    return {f"w{i}": scale * jax.random.normal(next(keys), s) for i, s in enumerate(shapes)}


@pytest.mark.parametrize("scale", [1e-3, 1.0])  # a norm under the threshold (unchanged) and over it (scaled)
def test_our_global_norm_clipping_is_optax_s_with_less_to_compile(scale):
    from ldm_jax.training import optim

    grads, max_norm = _gradient_tree(scale), 1.0
    norm = optim.global_norm(grads)
    np.testing.assert_allclose(norm, optax.global_norm(grads), rtol=1e-6)
    assert (float(norm) < max_norm) == (scale < 0.1)
    ours, theirs = optim.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    # The same (empty) state: a checkpointed optimizer state restores under either.
    assert jax.tree.structure(ours.init(grads)) == jax.tree.structure(theirs.init(grads))
    clipped, _ = ours.update(grads, ours.init(grads))
    expected, _ = theirs.update(grads, theirs.init(grads))
    for name in grads:
        np.testing.assert_allclose(clipped[name], expected[name], rtol=1e-6, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(optim.global_norm(clipped), min(float(norm), max_norm), rtol=1e-6)

    # What it is for: fewer operations per leaf for XLA to compile (48 leaves here).
    def size(transform):
        return len(jax.make_jaxpr(lambda g: transform.update(g, transform.init(g))[0])(grads).eqns)

    assert size(ours) < 0.6 * size(theirs), (size(ours), size(theirs))


def _state_copies(compiled) -> list[str]:
    """Copies of whole entry parameters (not scalars: the step counter) in a compiled step's optimised HLO: what XLA
    adds when it cannot update a donated buffer in place."""
    text = compiled.as_text()
    entry = text[text.index("\nENTRY ") :]
    entry = entry[: entry.index("\n}")]
    params = set(re.findall(r"%([\w.\-]+) = \S+ parameter\(", entry))
    copies = re.findall(r"= (\w+)\[([\d,]*)\]\S* copy\(%([\w.\-]+)\)", entry)
    return [name for _, dims, name in copies if name in params and dims]


def test_the_donated_state_is_updated_in_place():
    """The non-finite skip is a ``lax.cond`` (``state.skip_if_nonfinite``): selecting between the old and the new
    state leaf by leaf made XLA copy every parameter and both Adam moments at the start of every step (here 48
    copies of 16 leaves); the cond leaves the donated buffers to the update.
    Also the adversarial step, whose discriminator update is a cond on the step too."""
    keys = iter(jax.random.split(jax.random.key(1), 32))
    params = {f"w{i}": jax.random.normal(next(keys), (96, 96)) for i in range(16)}

    def loss_fn(p, frozen, batch, rng):
        h = batch["x"]
        for i in range(16):
            h = jnp.tanh(h @ p[f"w{i}"])
        return jnp.mean(jnp.square(h - batch["y"])), {}

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    step = functools.partial(train_step, loss_fn=loss_fn, tx=tx, lr_schedule=optax.constant_schedule(1e-3),
                             ema_decay=0.9)  # fmt: skip
    state = TrainState.create(params, tx)
    batch = {"x": jnp.ones((8, 96)), "y": jnp.zeros((8, 96))}
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, {}, batch, jax.random.key(0)).compile()
    assert _state_copies(compiled) == []
    # The same step still skips a non-finite batch and takes a finite one.
    new, m = jax.jit(step)(state, {}, batch, jax.random.key(0))
    assert int(m["train/nonfinite_skipped"]) == 0 and not np.array_equal(new.params["w0"], params["w0"])
    bad = {"x": batch["x"].at[0, 0].set(jnp.nan), "y": batch["y"]}
    _assert_skipped(new, jax.jit(step)(new, {}, bad, jax.random.key(0))[0])

    c = autoencoder_kl.get_config("tiny")
    c.disc.update(start=0, norm="none")
    task = build_task(c)
    adamw = optax.adamw(1e-3)
    gan_step = jax.jit(task.gan_step(adamw, adamw, optax.constant_schedule(1e-3)), donate_argnums=(0,))
    gan_state = task.init_state(jax.random.key(0), adamw, adamw)
    copies = _state_copies(gan_step.lower(gan_state, {}, _images(), jax.random.key(3)).compile())
    # Before the conds: 473 of the state's 641 leaves. XLA still copies the two output convolutions' biases (3 and 1
    # values), read by the discriminator's loss of the reconstruction.
    assert all("conv_out____bias" in name for name in copies), copies
