import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.text_encoders import CLIPTextTransformer
from ldm_jax.models.unet import UNet


@pytest.mark.parametrize("chans, f", [((8, 16, 16), 4), ((8, 16, 16, 16), 8)])
def test_autoencoder_shapes(chans, f):
    model = AutoencoderKL(block_out_channels=chans, layers_per_block=1, latent_channels=3, norm_groups=4)
    assert model.downsampling_factor == f
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    rng = jax.random.key(1)
    # Jitted: op-by-op (eager) execution compiles every primitive separately and is many times slower on CPU.
    params = jax.jit(model.init)(rng, x, rng)["params"]
    post = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(params, x)
    assert post.mean.shape == post.logvar.shape == (2, 32 // f, 32 // f, 3)
    z = post.sample(rng)
    assert z.shape == post.mean.shape and not np.allclose(z, post.mean)
    assert post.kl().shape == (2,) and bool(jnp.all(post.kl() >= 0))
    assert jax.eval_shape(lambda p, z: model.apply({"params": p}, z, method="decode"), params, z).shape == x.shape


def test_unet_output_is_zero_at_init_and_not_after_perturbation():
    unet = UNet(
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_levels=(False, True),
        num_heads=(2, 2),
        context_dim=8,
        norm_groups=8,
    )
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    t = jnp.array([3, 900])
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 8))
    params = jax.jit(unet.init)(jax.random.key(2), x, t, ctx)["params"]
    apply = jax.jit(lambda p, x, t, ctx: unet.apply({"params": p}, x, t, ctx))
    # LDM zero-initialises the output convolution: the untrained model predicts exactly zero.
    assert float(jnp.abs(apply(params, x, t, ctx)).max()) == 0.0
    params["conv_out"]["kernel"] = jax.random.normal(jax.random.key(3), params["conv_out"]["kernel"].shape)
    out = apply(params, x, t, ctx)
    assert out.shape == x.shape and float(jnp.abs(out).max()) > 0
    # The context reaches the output through cross-attention once the zero-initialised projections move.
    perturbed = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(4), p.shape), params)
    a = apply(perturbed, x, t, ctx)
    b = apply(perturbed, x, t, ctx * 2.0)
    assert float(jnp.abs(a - b).max()) > 1e-4


def test_text_encoder_is_causal():
    enc = CLIPTextTransformer(vocab_size=100, max_length=8, width=16, layers=2, heads=2)
    tokens = jnp.array([[1, 5, 7, 9, 2, 2, 2, 2]])
    params = enc.init(jax.random.key(0), tokens)["params"]
    a = enc.apply({"params": params}, tokens)
    b = enc.apply({"params": params}, tokens.at[0, 5].set(42))
    assert a.shape == (1, 8, 16)
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert float(jnp.abs(a[:, 5:] - b[:, 5:]).max()) > 1e-4
    penultimate = CLIPTextTransformer(vocab_size=100, max_length=8, width=16, layers=2, heads=2, output_layer=-2)
    assert penultimate.apply({"params": params}, tokens).shape == (1, 8, 16)
