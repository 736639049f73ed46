"""Attention implementations (ldm_jax.models.attention): every one computes the same function, the choice is
process-wide and read at trace time, and a choice that cannot run here is refused by name."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import ROOT, two_process_job, wait_all
from splash_driver import tiny_unet_case

from ldm_jax import jax_setup
from ldm_jax.models import attention
from ldm_jax.models.unet import UNET_VARIANTS, UNetConfig

DRIVER = os.path.join(ROOT, "tests", "splash_driver.py")


@pytest.fixture
def impl():
    before = attention.implementation()

    def use(name):
        attention.set_implementation(name)
        jax.clear_caches()  # a jitted function keeps the trace (and so the attention) it was first made with

    yield use
    attention.set_implementation(before)
    jax.clear_caches()


def _qkv(dtype, tq=24, tk=7, d=32, b=2):
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (b, t, d), jnp.float32) for key, t in zip(keys[:3], (tq, tk, tk), strict=True))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _reference(q, k, v, heads, mask=None):
    """The definition, in float64 numpy: softmax(q k^T / sqrt(d_head)) v per head."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, tq, d = q.shape
    hd = d // heads
    split = lambda a: a.reshape(b, a.shape[1], heads, hd).transpose(0, 2, 1, 3)  # noqa: E731
    s = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(hd)
    if mask is not None:
        s = np.where(np.broadcast_to(mask, s.shape), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ split(v)).transpose(0, 2, 1, 3).reshape(b, tq, d)


@pytest.mark.parametrize("name", ["xla", "jax", "auto"])
@pytest.mark.parametrize("masked", [False, True])
def test_every_implementation_computes_attention(impl, name, masked):
    impl(name)
    q, k, v = _qkv(jnp.float32, tq=7)
    mask = jnp.tril(jnp.ones((7, 7), bool))[None, None] if masked else None  # causal, as the text encoder
    out = jax.jit(lambda q, k, v: attention.attention(q, k, v, 4, mask))(q, k, v)
    np.testing.assert_allclose(
        np.asarray(out), _reference(q, k, v, 4, None if mask is None else np.asarray(mask)), atol=2e-6
    )


def test_half_precision_scores_and_softmax_are_float32(impl):
    """bfloat16 inputs: the scores and the softmax run in float32 (as cuDNN and JAX's path do), only the two
    products' inputs are bfloat16, so the result is as close to the float64 definition as bfloat16 inputs allow."""
    impl("xla")
    q, k, v = _qkv(jnp.bfloat16, tq=64, tk=64)
    out = attention.attention(q, k, v, 4)
    assert out.dtype == jnp.bfloat16
    ref = _reference(q, k, v, 4)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2)
    jaxs = attention._library_attention(q, k, v, 4, None, None)
    assert np.abs(np.asarray(out, np.float32) - ref).max() <= np.abs(np.asarray(jaxs, np.float32) - ref).max() * 1.5


def test_cudnn_is_refused_by_name_where_it_cannot_run(impl):
    impl("cudnn")
    q, k, v = _qkv(jnp.float32)
    with pytest.raises(ValueError, match=r"--attention_impl='cudnn': the backend is 'cpu', not 'gpu'"):
        attention.attention(q, k, v, 4)
    assert "float32" in attention.cudnn_refusal(q, 4, None) or jax.default_backend() != "gpu"
    with pytest.raises(ValueError, match=r"--attention_impl='flash': must be one of"):
        attention.set_implementation("flash")


def test_the_unet_is_the_same_function_under_every_cpu_implementation(impl):
    """The tiny UNet's output (random, non-zero output layer) with ldm_jax's einsum attention equals the one with
    jax.nn.dot_product_attention; the parameters do not depend on the implementation."""
    unet = UNetConfig(**UNET_VARIANTS["tiny"]).build(in_channels=4, out_channels=4, context_dim=16)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
    t = jnp.asarray([10, 900])
    ctx = jax.random.normal(jax.random.key(2), (2, 5, 16))
    outs, trees = {}, {}
    for name in ("xla", "jax"):
        impl(name)
        params = unet.init(jax.random.key(0), x, t, ctx)["params"]
        params["conv_out"] = jax.tree.map(
            lambda a: jax.random.normal(jax.random.key(3), a.shape) * 0.1, params["conv_out"]
        )
        trees[name] = jax.tree.structure(params)
        outs[name] = np.asarray(jax.jit(lambda p: unet.apply({"params": p}, x, t, ctx))(params))
    assert trees["xla"] == trees["jax"]
    assert np.abs(outs["xla"]).max() > 0.1
    np.testing.assert_allclose(outs["xla"], outs["jax"], atol=2e-5)


def test_configure_keeps_the_classic_threefry_on_cpu_only():
    """On CPU the classic threefry (fast to compile, the same draws on any mesh: the 8-vs-1 device tests); on
    accelerators JAX's partitionable mode, which draws each shard where it lives."""
    jax_setup.configure()
    assert jax.default_backend() == "cpu" and jax.config.jax_threefry_partitionable is False
    assert attention.implementation() == "auto"


# Head sizes 16 (a whole vector tile: row sums by reduction), 8 and 40 (room in the tile: row sums from a ones column).
@pytest.mark.parametrize("shape", [(2, 24, 7, 32), (2, 24, 7, 80), (2, 64, 64, 16), (1, 1024, 1024, 8)])
def test_the_hand_written_backward_equals_autodiff_of_the_definition(impl, shape, monkeypatch):
    """The xla path's custom VJP (probabilities recomputed from the log-sum-exp, products ordered by hand, on CPU a
    few slices per step) against JAX's output and derivative of jax.nn.dot_product_attention, the output both as
    training computes it (the forward rule, which also saves the log-sum-exp and walks the same slices as the
    backward) and as inference does (the primal, always whole): whole (4 MiB of 1024x1024 scores fit the budget),
    and forced through both loops: slices on one device, heads on several."""
    b, tq, tk, d = shape
    heads = 2 if d >= 16 else 1
    n, per_slice = b * heads, tq * tk * 4
    keys = jax.random.split(jax.random.key(4), 4)
    q, k, v = (jax.random.normal(key, (b, t, d)) for key, t in zip(keys[:3], (tq, tk, tk), strict=True))
    weight = jax.random.normal(keys[3], (b, tq, d))

    # devices: the real count, read once here, before a call patches jax.device_count
    def grads(name, plan, budget=attention._CPU_CHUNK_BYTES, devices=jax.device_count()):  # noqa: B008
        impl(name)
        monkeypatch.setattr(attention, "_CPU_CHUNK_BYTES", budget)
        monkeypatch.setattr(jax, "device_count", lambda: devices)
        assert attention.slice_plan(heads, n, tq, tk) == plan

        def forward_and_backward(q, k, v):
            out, pull = jax.vjp(lambda q, k, v: attention.attention(q, k, v, heads), q, k, v)
            return out, pull(weight), attention.attention(q, k, v, heads)

        return jax.jit(forward_and_backward)(q, k, v)

    reference = grads("jax", ("whole", n))
    ours = [grads("xla", ("whole", n))]
    if n > 1:
        ours.append(grads("xla", ("slices", n // 2), (n // 2) * per_slice, devices=1))
        ours.append(grads("xla", ("heads", 1), per_slice, devices=8))
    for out, result, inference in ours:
        np.testing.assert_allclose(np.asarray(out), np.asarray(reference[0]), atol=2e-5, err_msg="output")
        np.testing.assert_allclose(np.asarray(inference), np.asarray(reference[0]), atol=2e-5, err_msg="inference")
        for mine, theirs, name in zip(result, reference[1], "qkv", strict=True):
            scale = float(jnp.abs(theirs).max())
            assert scale > 0
            np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), atol=2e-5 * scale, err_msg=f"d{name}")


def test_the_chunked_attention_on_a_sharded_batch_equals_one_device(impl, monkeypatch):
    """With several devices the training forward's and the backward's loops run over heads, never over the batch
    the mesh shards: on 8 devices with the batch split 8 ways the gradients, and the inference output, stay sharded
    and equal the one-device ones."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    impl("xla")
    b, t, d, heads = 8, 64, 16, 2
    monkeypatch.setattr(attention, "_CPU_CHUNK_BYTES", t * t * 4)  # one example's head per device and step
    assert attention.slice_plan(heads, b * heads, t, t) == ("heads", 1)
    keys = jax.random.split(jax.random.key(5), 4)
    q, k, v, weight = (jax.random.normal(key, (b, t, d)) for key in keys)
    loss = lambda q, k, v: jnp.sum(attention.attention(q, k, v, heads) * weight)  # noqa: E731
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    one = grad(q, k, v)
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    sharded = grad(*(jax.device_put(a, rows) for a in (q, k, v)))
    assert sharded[0].sharding.spec == rows.spec
    for a, b_ in zip(one, sharded, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=1e-6)
    forward = jax.jit(lambda q, k, v: attention.attention(q, k, v, heads))
    out = forward(*(jax.device_put(a, rows) for a in (q, k, v)))
    assert out.sharding.spec == rows.spec
    np.testing.assert_allclose(np.asarray(out), np.asarray(forward(q, k, v)), rtol=1e-5, atol=1e-6)


@pytest.fixture
def splash():
    """The TPU splash kernel, run by Pallas's interpreter (this machine has no TPU): the same kernel code, grid and
    padding as on a TPU, executed op by op."""
    before = attention.implementation()
    attention.set_implementation("splash", interpret=True)
    jax.clear_caches()
    yield
    attention.set_implementation(before)
    jax.clear_caches()


@pytest.mark.parametrize("shape", [(8, 24, 7, 32, 4), (1, 200, 77, 80, 2)])
def test_the_splash_kernel_computes_attention_and_its_gradient(splash, shape, monkeypatch):
    """Forward against the float64 definition, gradients against JAX's derivative of jax.nn.dot_product_attention.
    Neither sequence is a multiple of the kernel's 128-row blocks and the head sizes (8, 40: SD-1.5's) are not
    multiples of 128, so the padding (keys masked by segment ids, zero head columns) is what is tested; the second
    shape is a cross-attention on 77 text tokens. With 8 devices, the first batch is split over them (one example
    per device under shard_map); the second, which they do not divide, runs whole on each, and also as on a single
    device (no shard_map)."""
    b, tq, tk, d, heads = shape
    keys = jax.random.split(jax.random.key(6), 4)
    q, k, v = (jax.random.normal(key, (b, t, d)) for key, t in zip(keys[:3], (tq, tk, tk), strict=True))
    fwd = lambda q, k, v: attention.attention(q, k, v, heads)  # noqa: E731
    program = str(jax.make_jaxpr(fwd)(q, k, v))
    assert "pallas_call" in program and "shard_map" in program
    assert ("P('devices',), P('devices',), P('devices',))" in program) == (b == 8)  # q, k, v split by rows
    out = jax.jit(fwd)(q, k, v)
    assert out.shape == (b, tq, d)
    reference = _reference(q, k, v, heads)
    np.testing.assert_allclose(np.asarray(out), reference, atol=5e-6)
    if b == 1:
        with monkeypatch.context() as m:
            m.setattr(jax, "device_count", lambda: 1)
            alone = lambda q, k, v: attention.attention(q, k, v, heads)  # noqa: E731 (a new function: a new trace)
            program = str(jax.make_jaxpr(alone)(q, k, v))
            assert "pallas_call" in program and "shard_map" not in program
            np.testing.assert_allclose(np.asarray(jax.jit(alone)(q, k, v)), reference, atol=5e-6)

    weight = jax.random.normal(keys[3], (b, tq, d))
    loss = lambda q, k, v: jnp.sum(attention.attention(q, k, v, heads) * weight)  # noqa: E731
    ours = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    theirs = jax.grad(
        lambda q, k, v: jnp.sum(attention._library_attention(q, k, v, heads, None, None) * weight), argnums=(0, 1, 2)
    )(q, k, v)
    for mine, ref, name in zip(ours, theirs, "qkv", strict=True):
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(np.asarray(mine), np.asarray(ref), atol=2e-5 * scale, err_msg=f"d{name}")


def test_the_unet_under_splash_is_the_same_function_sharded_over_8_devices(splash):
    """The tiny UNet (self-attention on 64 positions, cross-attention on 5 tokens) under the splash kernel, with the
    batch split over an 8-device (data, fsdp) mesh and the kernel run per device under shard_map, equals the xla
    path on one device, and its output stays sharded over the batch."""
    from ldm_jax.training.sharding import batch_sharding, make_mesh

    params, (x, t, ctx), apply = tiny_unet_case()
    program = str(jax.make_jaxpr(apply)(params, x, t, ctx))
    # Four transformer blocks at the 8x8 level, a self- and a cross-attention each, every one a kernel call.
    assert "pallas_call" in program and program.count("shard_map") == 8
    rows = batch_sharding(make_mesh(4, 2))
    sharded = jax.jit(apply)(params, *(jax.device_put(a, rows) for a in (x, t, ctx)))
    assert sharded.sharding.is_equivalent_to(rows, sharded.ndim)
    reference = _xla_reference(params, (x, t, ctx), apply)
    np.testing.assert_allclose(np.asarray(sharded), reference, atol=2e-5)


def _xla_reference(params, inputs, apply):
    before = attention.implementation()
    attention.set_implementation("xla")
    jax.clear_caches()
    try:
        out = np.asarray(jax.jit(apply)(params, *inputs))
    finally:
        attention.set_implementation(before, interpret=before == "splash")
        jax.clear_caches()
    assert np.abs(out).max() > 0.1
    return out


def test_the_unet_under_splash_on_a_mesh_over_two_processes(tmp_path):
    """As on a pod: 2 processes x 2 CPU devices (jax.distributed over 127.0.0.1) put the batch on one (data, fsdp)
    mesh over all 4 devices and run the tiny UNet with the splash kernel under shard_map; the gathered output
    equals the xla path in this process."""
    out = str(tmp_path / "out.npy")
    procs = two_process_job(
        [sys.executable, DRIVER, f"--out={out}"], str(tmp_path / "splash"), env={"PYTHONPATH": ROOT}
    )
    wait_all(procs, timeout=600)
    with open(out + ".json") as f:
        report = json.load(f)
    assert report == {
        "processes": 2,
        "devices": 4,
        "kernel": True,
        "shard_maps": 8,
        "output_sharded_like_rows": True,
    }
    params, inputs, apply = tiny_unet_case()
    np.testing.assert_allclose(np.load(out), _xla_reference(params, inputs, apply), atol=2e-5)


def test_splash_is_refused_by_name_off_tpu(impl):
    q, k, v = _qkv(jnp.float32)
    impl("splash")
    with pytest.raises(ValueError, match=r"--attention_impl='splash': a TPU Pallas kernel, and the backend is 'cpu'"):
        attention.attention(q, k, v, 4)
    with pytest.raises(ValueError, match=r"--attention_impl='splash': a TPU Pallas kernel"):
        jax_setup.configure(attention_impl="splash")
    with pytest.raises(ValueError, match=r"interpret=True applies to the 'splash' implementation, not 'xla'"):
        attention.set_implementation("xla", interpret=True)
