"""Rematerialisation and bf16 change memory, not parameters or results.

Memory is XLA's own account of the compiled gradient program (``memory_analysis().temp_size_in_bytes``): no
execution is needed for it, and it is deterministic for a given program.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import config_lib
from ldm_jax.tasks import validate_config
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.remat import REMAT_POLICIES
from ldm_jax.models.unet import UNet

# Big enough that activations dominate the gradient program's temporaries, small enough to compile in seconds.
UNET = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_levels=(False, True),
    num_heads=(2, 4),
    context_dim=32,
    norm_groups=8,
)
AE = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_groups=8)


def _perturbed(params, scale=0.02):
    # The zero-initialised output layers would zero every other gradient: perturb so each parameter gets one.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(
        tree, [p + scale * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)]
    )


@functools.cache
def _unet_inputs():
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 4))
    t = jnp.array([1, 250, 500, 999])
    ctx = jax.random.normal(jax.random.key(1), (4, 8, 32))
    params = jax.jit(UNet(**UNET).init)(jax.random.key(2), x, t, ctx)["params"]
    return _perturbed(params), x, t, ctx


@functools.cache
def _unet_grad(policy: str, dtype=jnp.float32):
    """(loss, grads, temp bytes) of an epsilon-MSE step of the UNet under ``policy`` and compute ``dtype``."""
    params, x, t, ctx = _unet_inputs()
    unet = UNet(**UNET, remat_policy=policy, dtype=dtype)

    def loss(p):
        out = unet.apply({"params": p}, x, t, ctx, train=True, rngs={"dropout": jax.random.key(3)})
        return jnp.mean(jnp.square(out - x))

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    value, grads = compiled(params)
    return value, grads, compiled.memory_analysis().temp_size_in_bytes


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-7):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def _shapes(module, *inputs):
    tree = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    return jax.tree_util.tree_map_with_path(lambda p, a: (jax.tree_util.keystr(p), a.shape, a.dtype), tree)


def test_policies_keep_the_parameter_tree():
    x, t, ctx = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 3, 32))
    img, rng = jnp.zeros((1, 8, 8, 3)), jax.random.key(0)
    unet_ref = _shapes(UNet(**UNET), x, t, ctx)
    ae_ref = _shapes(AutoencoderKL(**AE), img, rng)
    assert "down_blocks_1_attentions_0" in unet_ref and "mid_block_resnets_0" in unet_ref
    for policy in REMAT_POLICIES:
        assert _shapes(UNet(**UNET, remat_policy=policy), x, t, ctx) == unet_ref, policy
        assert _shapes(AutoencoderKL(**AE, remat_policy=policy), img, rng) == ae_ref, policy
    with pytest.raises(ValueError, match="remat_policy='bogus'"):
        _shapes(UNet(**UNET, remat_policy="bogus"), x, t, ctx)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_unet_remat_same_loss_and_grads_less_memory(policy):
    value0, grads0, temp0 = _unet_grad("none")
    value, grads, temp = _unet_grad(policy)
    print(f"UNet grad temporaries: none {temp0 / 2**20:.1f} MiB, {policy} {temp / 2**20:.1f} MiB")
    np.testing.assert_allclose(value, value0, rtol=1e-6)
    _assert_trees_close(grads, grads0)
    if policy == "full":
        assert temp < temp0


def test_autoencoder_remat_same_grads_less_memory():
    img = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1, maxval=1)
    rng = jax.random.key(1)
    params = _perturbed(jax.jit(AutoencoderKL(**AE).init)(rng, img, rng)["params"])
    results = {}
    for policy in ("none", "full"):
        model = AutoencoderKL(**AE, remat_policy=policy)

        def loss(p, model=model):
            rec, post = model.apply({"params": p}, img, rng)
            return jnp.mean(jnp.abs(rec - img)) + 1e-6 * jnp.mean(post.kl())

        compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
        results[policy] = (*compiled(params), compiled.memory_analysis().temp_size_in_bytes)
    (v0, g0, temp0), (v1, g1, temp1) = results["none"], results["full"]
    print(f"autoencoder grad temporaries: none {temp0 / 2**20:.1f} MiB, full {temp1 / 2**20:.1f} MiB")
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    _assert_trees_close(g1, g0)
    assert temp1 < temp0


def test_bf16_keeps_float32_params_and_agrees_with_float32():
    _, x, t, ctx = _unet_inputs()
    bf16 = _shapes(UNet(**UNET, dtype=jnp.bfloat16), x, t, ctx)
    assert {dtype for _, _, dtype in jax.tree.leaves(bf16, is_leaf=lambda a: isinstance(a, tuple))} == {
        jnp.dtype(jnp.float32)
    }
    value32, grads32, temp32 = _unet_grad("none")
    value16, grads16, temp16 = _unet_grad("none", jnp.bfloat16)
    print(f"UNet grad temporaries: float32 {temp32 / 2**20:.1f} MiB, bfloat16 {temp16 / 2**20:.1f} MiB")
    assert jax.tree.all(jax.tree.map(lambda g: g.dtype == jnp.float32, grads16))
    assert abs(float(value16) - float(value32)) / float(value32) < 2e-2
    g32 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads32)])
    g16 = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads16)])
    cosine = float(jnp.dot(g32, g16) / (jnp.linalg.norm(g32) * jnp.linalg.norm(g16)))
    assert cosine > 0.99, cosine
    assert temp16 < temp32


def test_config_validates_and_defaults_remat_policy(tmp_path):
    from configs import autoencoder_kl, txt2img

    c = txt2img.get_config("tiny")
    c.first_stage.workdir = "/some/ae"
    assert c.unet.remat_policy == "none"
    c.unet.remat_policy = "bogus"
    with pytest.raises(ValueError, match="unet.remat_policy"):
        validate_config(c)
    ae = autoencoder_kl.get_config("tiny")
    ae.model.remat_policy = "all"
    with pytest.raises(ValueError, match="model.remat_policy"):
        validate_config(ae)
    # A config without the field is refused, naming it (0.1 shipped no older format to migrate).
    for config, field in ((txt2img.get_config("tiny"), "unet"), (autoencoder_kl.get_config("tiny"), "model")):
        d = json.loads(config.to_json_best_effort())
        d[field].pop("remat_policy")
        d.get("first_stage", {})["workdir"] = "/some/ae"
        path = tmp_path / "config.json"
        path.write_text(json.dumps(d))
        with pytest.raises(
            ValueError, match=f'{field}.remat_policy: missing.*add it to its config.json; default "none"'
        ):
            validate_config(config_lib.load_config(str(path)))
