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


@pytest.mark.parametrize(
    "shape, groups, dtype",
    [
        ((2, 8, 8, 32), 8, jnp.float32),
        ((3, 5, 7, 64), 32, jnp.float32),  # odd sizes: positions are not a multiple of anything
        ((2, 16, 12), 4, jnp.float32),  # [B, T, C]
        ((2, 6, 6, 16), 16, jnp.bfloat16),  # bf16 in and out, float32 statistics
    ],
)
def test_group_norm_is_flax_group_norm(shape, groups, dtype):
    """layers.GroupNorm computes flax's nn.GroupNorm (the function the converters and checkpoints assume) from
    the same parameters, with the same gradients, on an input whose groups differ in mean and scale."""
    from flax import linen as nn

    from ldm_jax.models.layers import GroupNorm

    k = jax.random.split(jax.random.key(0), 4)
    offsets = jnp.arange(shape[-1]) * 0.3 - 2.0  # a mean far from zero tests the one-pass variance's rounding
    x = (jax.random.normal(k[0], shape) * jnp.linspace(0.5, 3.0, shape[-1]) + offsets).astype(dtype)
    ours, ref = GroupNorm(groups, epsilon=1e-5, dtype=dtype), nn.GroupNorm(groups, epsilon=1e-5, dtype=dtype)
    params = ours.init(k[1], x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref.init(k[1], x))
    np.testing.assert_array_equal(params["params"]["scale"], 1.0)
    np.testing.assert_array_equal(params["params"]["bias"], 0.0)
    params = {"params": {"scale": jax.random.normal(k[2], shape[-1:]), "bias": jax.random.normal(k[3], shape[-1:])}}
    out, want = jax.jit(ours.apply)(params, x), jax.jit(ref.apply)(params, x)
    assert out.dtype == want.dtype == dtype
    # Both take the variance as E[x^2] - E[x]^2 in float32; with means up to 17 in this input, their different
    # summation orders round apart by about 1e-5.
    tol = 3e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
    if dtype == jnp.float32:
        w = jax.random.normal(jax.random.key(5), shape)

        def grads(model):
            return jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply(p, x) * w), argnums=(0, 1)))(params, x)

        for got, exp in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(ref)), strict=True):
            np.testing.assert_allclose(got, exp, atol=3e-5, rtol=5e-5)


def test_group_norm_refuses_groups_that_do_not_divide_the_channels():
    from ldm_jax.models.layers import GroupNorm

    with pytest.raises(ValueError, match="num_groups=3 must divide the 8 channels"):
        GroupNorm(3).init(jax.random.key(0), jnp.ones((1, 2, 2, 8)))


def test_upsample_repeats_each_pixel_as_nearest_resize_does():
    from ldm_jax.models.layers import Upsample

    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
    model = Upsample(4)
    params = model.init(jax.random.key(1), x)
    # The 3x3 convolution after it, replaced by the identity, leaves the upsampled map.
    identity = jnp.zeros((3, 3, 4, 4)).at[1, 1].set(jnp.eye(4))
    params = {"params": {"conv": {"kernel": identity, "bias": jnp.zeros(4)}}}
    out = jax.jit(model.apply)(params, x)
    np.testing.assert_array_equal(out, jax.image.resize(x, (2, 6, 10, 4), method="nearest"))


def test_sincos_position_embedding_values_and_distinct_rows():
    from ldm_jax.models.layers import sincos_position_embedding

    h, w, dim = 4, 6, 18  # 4 frequencies, 2 zero channels
    e = sincos_position_embedding(h, w, dim)
    assert e.shape == (h * w, dim) and e.dtype == np.float32
    freqs = np.pi * np.geomspace(1.0, max(h, w) / 2, 4)
    for i in range(h):
        for j in range(w):
            y, x = (i + 0.5) / h, (j + 0.5) / w
            want = [*np.sin(y * freqs), *np.cos(y * freqs), *np.sin(x * freqs), *np.cos(x * freqs), 0.0, 0.0]
            np.testing.assert_allclose(e[i * w + j], want, atol=1e-6)
    # Every pixel of the maps a UNet sees gets its own code, far from every other's.
    for side, dim in ((4, 32), (8, 64), (16, 32), (32, 64)):
        e = sincos_position_embedding(side, side, dim)
        d = np.linalg.norm(e[:, None] - e[None], axis=-1) + np.eye(side * side) * 1e9
        assert d.min() > 0.2, (side, dim, d.min())


@pytest.mark.parametrize("linear", [False, True])
def test_position_embedding_tells_the_transformer_where_each_pixel_is(linear):
    """On a uniform feature map a SpatialTransformer without a position input gives every pixel the same output (it
    only has 1x1 projections and attention); with ``position_embedding="sincos"`` each pixel's output differs."""
    from ldm_jax.models.layers import SpatialTransformer

    x = jnp.ones((2, 8, 8, 16)) * jnp.array([0.3, -1.2])[:, None, None, None]
    x = x + jnp.linspace(-1, 1, 16)  # uniform over pixels, varied over channels
    ctx = jax.random.normal(jax.random.key(0), (2, 5, 12))
    outs = {}
    for kind in ("none", "sincos"):
        block = SpatialTransformer(2, 8, groups=4, use_linear_projection=linear, position_embedding=kind)
        params = block.init(jax.random.key(1), x, ctx)["params"]
        # proj_out starts at zero (the block is the identity); give it weights so the tokens reach the output.
        params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
        outs[kind] = np.asarray(block.apply({"params": params}, x, ctx)).reshape(2, 64, 16)
    spread = lambda y: float(np.abs(y - y[:, :1]).max())  # noqa: E731
    assert spread(outs["none"]) < 1e-5
    y = outs["sincos"]
    assert spread(y) > 1e-2
    d = np.linalg.norm(y[:, :, None] - y[:, None], axis=-1) + np.eye(64) * 1e9
    assert d.min() > 1e-4, d.min()


def test_position_embedding_adds_no_parameters_and_is_validated():
    from configs import txt2img

    from ldm_jax.tasks import validate_config

    kw = dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(True, True), num_heads=(2, 2))
    kw.update(context_dim=8, norm_groups=8)
    x, t, ctx = jnp.zeros((1, 8, 8, 4)), jnp.array([10]), jnp.zeros((1, 3, 8))
    shapes = {
        kind: jax.tree.map(
            lambda a: a.shape, jax.eval_shape(UNet(**kw, position_embedding=kind).init, jax.random.key(0), x, t, ctx)
        )
        for kind in ("none", "sincos")
    }
    assert shapes["none"] == shapes["sincos"]
    c = txt2img.get_config("tiny")
    c.first_stage.workdir = "/some/ae"
    assert c.unet.position_embedding == "none"
    c.unet.position_embedding = "learned"
    with pytest.raises(ValueError, match=r"unet.position_embedding='learned': must be one of \('none', 'sincos'\)"):
        validate_config(c)


def test_export_refuses_a_run_with_a_position_embedding(tmp_path):
    """diffusers' UNet has no position input: exporting such a run (whole, or a LoRA run's adapters alone) would
    write weights for something else. The refusal names the field and comes before anything is written."""
    from configs import autoencoder_kl, txt2img

    from ldm_jax import config_lib
    from ldm_jax.interop import stable_diffusion

    ae, run, out = tmp_path / "ae", tmp_path / "run", tmp_path / "out"
    ae.mkdir(), run.mkdir()
    config_lib.save_config(autoencoder_kl.get_config("tiny"), str(ae / "config.json"))
    c = txt2img.get_config("tiny")
    c.first_stage.workdir = str(ae)
    c.unet.position_embedding = "sincos"
    config_lib.save_config(c, str(run / "config.json"))
    with pytest.raises(ValueError, match="unet.position_embedding='sincos'.*only runs with 'none' export"):
        stable_diffusion.export_workdir(str(run), str(out))
    assert not out.exists()
    # A LoRA run on such a base: its adapters alone would be applied to a UNet diffusers cannot build.
    c.lora.rank = 4
    config_lib.save_config(c, str(run / "config.json"))
    lora_file = tmp_path / "adapters.safetensors"
    with pytest.raises(ValueError, match="unet.position_embedding='sincos'.*only runs with 'none' export"):
        stable_diffusion.export_lora(str(run), str(lora_file))
    assert not lora_file.exists()


def test_text_time_embedding_reaches_the_output_and_is_validated():
    """``unet.addition_embed_type="text"``: the pooled prompt is part of the timestep embedding (changing its
    projection changes the prediction), and the config refuses an unknown kind, a run without a prompt and heads that
    do not divide the text width, naming the field. Parity with diffusers' TextTimeEmbedding: test_interop."""
    from configs import class_cond, txt2img

    from ldm_jax.tasks import validate_config

    kw = dict(block_out_channels=(16, 32), layers_per_block=1, attention_levels=(False, True), num_heads=(2, 2))
    kw.update(context_dim=8, norm_groups=8, addition_embed_type="text", addition_embed_type_num_heads=2)
    x, t = jax.random.normal(jax.random.key(1), (2, 8, 8, 4)), jnp.array([10, 700])
    ctx = jax.random.normal(jax.random.key(2), (2, 3, 8))
    unet = UNet(**kw)
    params = unet.init(jax.random.key(0), x, t, ctx)["params"]
    assert sorted(params["add_embedding"]) == ["norm1", "norm2", "pool", "proj"]
    # Zero-initialised convolutions (conv_out, every ResnetBlock's conv2) would hide the timestep embedding: move
    # every weight off its initial value first.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = treedef.unflatten([a + 0.2 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)])
    out = unet.apply({"params": params}, x, t, ctx)
    moved = jax.tree.map(lambda a: a, params)
    moved["add_embedding"]["norm2"]["bias"] = moved["add_embedding"]["norm2"]["bias"] + 1.0
    assert float(jnp.max(jnp.abs(unet.apply({"params": moved}, x, t, ctx) - out))) > 1e-3

    c = txt2img.get_config("tiny")
    c.first_stage.workdir = "/some/ae"
    assert c.unet.addition_embed_type == "none"
    c.unet.addition_embed_type = "pooled"
    with pytest.raises(ValueError, match=r"unet.addition_embed_type='pooled': must be one of \('none', 'text'\)"):
        validate_config(c)
    c.unet.addition_embed_type, c.unet.addition_embed_type_num_heads = "text", 3
    with pytest.raises(ValueError, match=r"unet.addition_embed_type_num_heads=3: must divide the text encoder's width"):
        validate_config(c)
    c.unet.addition_embed_type_num_heads = 4
    validate_config(c)
    c = class_cond.get_config("tiny")
    c.first_stage.workdir = "/some/ae"
    c.unet.addition_embed_type = "text"
    with pytest.raises(ValueError, match="unet.addition_embed_type='text': pools the prompt's encoding; a class_cond"):
        validate_config(c)
