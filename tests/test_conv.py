"""Convolution implementations (ldm_jax.models.conv): the matmul form computes XLA's convolution, with the same
gradients, inside the models' blocks; ``auto`` takes it only where it is faster on this backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import conv
from ldm_jax.models.layers import ResnetBlock

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.fixture
def impl():
    before = conv.implementation()

    def use(name):
        conv.set_implementation(name)
        jax.clear_caches()  # a jitted function keeps the trace it was first made with

    yield use
    conv.set_implementation(before)
    jax.clear_caches()


def _xla(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 4), (1, 8, 8, 16, 8), (3, 1, 1, 2, 2)])
def test_matmul_form_equals_xla_convolution_and_its_gradients(shape):
    b, h, w, cin, cout = shape
    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (b, h, w, cin))
    k = jax.random.normal(kk, (3, 3, cin, cout))
    g = jax.random.normal(kg, (b, h, w, cout))
    np.testing.assert_allclose(conv.matmul_conv3x3(x, k), _xla(x, k), rtol=1e-5, atol=1e-5)
    # The borders (zero padding) and the tap order are what a wrong im2col gets wrong: compare the gradients too.
    for a, b_ in zip(jax.vjp(conv.matmul_conv3x3, x, k)[1](g), jax.vjp(_xla, x, k)[1](g), strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-4)


def _primitives(fn, *args) -> list:
    return [e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns]


def test_auto_takes_the_matmul_form_only_for_deep_small_convolutions_on_cpu(impl):
    def run(x, k):
        return conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=jax.lax.conv_dimension_numbers(
            x.shape, k.shape, NHWC))  # fmt: skip

    deep = (jnp.zeros((1, 8, 8, 512)), jnp.zeros((3, 3, 512, 64)))
    deeper = (jnp.zeros((1, 16, 16, 1024)), jnp.zeros((3, 3, 1024, 8)))
    wide = (jnp.zeros((1, 16, 16, 640)), jnp.zeros((3, 3, 640, 64)))
    narrow = (jnp.zeros((1, 8, 8, 64)), jnp.zeros((3, 3, 64, 64)))
    impl("auto")
    assert jax.default_backend() == "cpu"
    assert "conv_general_dilated" not in _primitives(run, *deep) and "dot_general" in _primitives(run, *deep)
    assert "conv_general_dilated" not in _primitives(run, *deeper)
    assert "conv_general_dilated" in _primitives(run, *wide)
    assert "conv_general_dilated" in _primitives(run, *narrow)
    impl("xla")
    assert "conv_general_dilated" in _primitives(run, *deep)
    impl("matmul")
    assert "conv_general_dilated" not in _primitives(run, *narrow)
    # A strided convolution is never the matmul form.
    strided = lambda x, k: conv.conv_general_dilated(  # noqa: E731
        x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, k.shape, NHWC)
    )
    assert "conv_general_dilated" in _primitives(strided, *narrow)
    with pytest.raises(ValueError, match="--conv_impl='im2col': must be one of"):
        conv.set_implementation("im2col")


def test_a_resnet_block_is_the_same_function_under_both_implementations(impl):
    block = ResnetBlock(out_channels=24, groups=4)
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 16))
    temb = jax.random.normal(jax.random.key(2), (2, 32))
    params = block.init(jax.random.key(3), x, temb)["params"]

    def loss(p, x):
        return jnp.sum(jnp.sin(block.apply({"params": p}, x, temb)))

    results, convs = {}, {}
    for name in ("xla", "matmul"):
        impl(name)
        convs[name] = _primitives(jax.grad(loss), params, x).count("conv_general_dilated")
        results[name] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    # conv1 and conv2 (3x3) follow the choice, forward and backward; the 1x1 shortcut stays XLA's convolution.
    assert convs["xla"] >= convs["matmul"] + 4 and convs["matmul"] >= 1, convs
    (va, ga), (vb, gb) = results["xla"], results["matmul"]
    np.testing.assert_allclose(va, vb, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
