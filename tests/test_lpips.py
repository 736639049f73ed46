"""LPIPS (VGG16, v0.1): the formula against a plain numpy implementation, the weight converters and loaders, parity
with a PyTorch rebuild of lpips (tests/reference/lpips_oracle.py, in the reference environment), the shipped heads,
and the properties the autoencoder loss relies on (gradients reach the images, LPIPS(x, x) = 0, monotonicity).

The trunk is the real VGG16 (real channel widths) with random weights: cheap at 32x32, and what matters here is the
computation, not ImageNet features. Set LDM_JAX_LPIPS_WEIGHTS to lpips' weights/v0.1/vgg.pth (or the lpips 0.1.4
wheel) to also compare the shipped heads with the original file value by value.
"""

import hashlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_env import ROOT, run_reference

from ldm_jax.interop import lpips_weights
from ldm_jax.interop.lpips_weights import (
    SHIPPED_HEADS_PATH,
    load_lpips_params,
    lpips_heads_from_state_dict,
    vgg16_params_from_state_dict,
)
from ldm_jax.models import lpips as lpips_model
from ldm_jax.models.lpips import LPIPS, LPIPS_CHANNELS, lpips_distance, lpips_param_shapes

ORACLE = os.path.join(ROOT, "tests", "reference", "lpips_oracle.py")
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
# sha256 of the float32 bytes of lin{k}.model.1.weight in lpips 0.1.4's weights/v0.1/vgg.pth.
PUBLISHED_HEADS_SHA256 = (
    "b4ee423bb7c8ef01a0198639747b33583380b4cf8a087ef48bc081cbab036a96",
    "7fd9e5e5d8d68cc0b8fa2828099bae7753bd9376c9b40607ddf520f0c24d565d",
    "63d06a086d0592f7cbb32ccfa9c0cd8b89c53798f5985e986b2048625e214ad9",
    "16246e8056f57bc5539c47ef5406d343cfa17575f70508e7b577b51056f7be66",
    "3735a0ea893525bde6544cab01a0525bee073f64819d7a0feb7ad37a6965052d",
)

# One jitted function for every test, and two image shapes: each compiles once. SMALL is the smallest size LPIPS
# takes (16: relu5_3 is 1x1) by an odd one (35 -> 17 -> 8 -> 4 -> 2: floor pooling, as PyTorch's MaxPool2d).
distance = jax.jit(lpips_distance)
IMAGES, SMALL = (2, 32, 32, 3), (1, 16, 35, 3)


def random_vgg_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """torchvision layout, He-initialised so activations keep their scale through 13 layers; a stand-in classifier."""
    rng = np.random.default_rng(seed)
    sd, cin = {}, 3
    for index, cout in zip(CONV_INDICES, (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512), strict=True):
        sd[f"features.{index}.weight"] = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(
            np.float32
        )
        sd[f"features.{index}.bias"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        cin = cout
    sd["classifier.0.weight"] = rng.standard_normal((8, 16)).astype(np.float32)
    sd["classifier.0.bias"] = rng.standard_normal(8).astype(np.float32)
    return sd


def shipped_heads() -> dict[str, np.ndarray]:
    with np.load(SHIPPED_HEADS_PATH) as f:
        return {k: f[k] for k in f.files}


def images(seed: int, shape=IMAGES) -> np.ndarray:
    """Smooth structure plus texture, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    b, h, w, c = shape
    coarse = rng.uniform(-1, 1, (b, -(-h // 4), -(-w // 4), c)).repeat(4, 1).repeat(4, 2)[:, :h, :w]
    return np.clip(0.8 * coarse + 0.2 * rng.uniform(-1, 1, shape), -1, 1).astype(np.float32)


@pytest.fixture(scope="module")
def sd():
    return random_vgg_state_dict()


@pytest.fixture(scope="module")
def params(sd):
    return {"net": vgg16_params_from_state_dict(sd), **lpips_heads_from_state_dict(shipped_heads())}


# ---- the formula -------------------------------------------------------------------------------------------------


def numpy_lpips(sd, heads, x0, x1):
    """lpips' VGG16 v0.1 distance, written out in float64 numpy straight from the torch-layout weights."""

    def trunk(x):
        x = (x.astype(np.float64) - np.array([-0.030, -0.088, -0.188])) / np.array([0.458, 0.448, 0.450])
        taps = []
        for index in CONV_INDICES:
            if index in (5, 10, 17, 24):  # a max-pool sits at the index just before these convs
                b, h, w, c = x.shape
                x = x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
            weight = sd[f"features.{index}.weight"].astype(np.float64)  # [out, in, 3, 3]
            b, h, w, c = x.shape
            padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            # 3x3 patches [B*H*W, 9*C] (row-major over dy, dx, c) against the kernel laid out the same way.
            patches = np.concatenate(
                [padded[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=-1
            ).reshape(b * h * w, 9 * c)
            y = patches @ weight.transpose(2, 3, 1, 0).reshape(9 * c, -1) + sd[f"features.{index}.bias"]
            x = np.maximum(y, 0).reshape(b, h, w, -1)
            if index in (2, 7, 14, 21, 28):  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
                taps.append(x)
        return taps

    total = 0.0
    for k, (f0, f1) in enumerate(zip(trunk(x0), trunk(x1), strict=True)):
        f0 = f0 / (np.sqrt((f0**2).sum(-1, keepdims=True)) + 1e-10)
        f1 = f1 / (np.sqrt((f1**2).sum(-1, keepdims=True)) + 1e-10)
        total = total + ((f0 - f1) ** 2 @ heads[f"lin{k}"].astype(np.float64)).mean(axis=(1, 2))
    return total


def test_formula_matches_numpy_reference(sd, params):
    rng = np.random.default_rng(3)
    heads = {f"lin{k}": rng.uniform(0, 1, c).astype(np.float32) for k, c in enumerate(LPIPS_CHANNELS)}
    random_heads = {"net": params["net"], **lpips_heads_from_state_dict(heads)}
    for shape in (IMAGES, SMALL):
        x0, x1 = images(1, shape), images(2, shape)
        got = np.asarray(distance(random_heads, x0, x1))
        want = numpy_lpips(sd, heads, x0, x1)
        assert got.shape == (shape[0],) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=2e-5)


def test_too_small_or_mismatched_images_are_refused(params):
    with pytest.raises(ValueError, match="H and W must be >= 16"):
        jax.eval_shape(lpips_distance, params, np.zeros((1, 8, 32, 3)), np.zeros((1, 8, 32, 3)))
    with pytest.raises(ValueError, match="differ"):
        jax.eval_shape(lpips_distance, params, np.zeros((1, 16, 16, 3)), np.zeros((2, 16, 16, 3)))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        jax.eval_shape(lpips_distance, params, np.zeros((1, 16, 16, 4)), np.zeros((1, 16, 16, 4)))


# ---- converters and loaders --------------------------------------------------------------------------------------


def test_vgg_converter_is_exact_and_matches_the_model_tree(sd, params):
    net = vgg16_params_from_state_dict(sd)
    assert sorted(net) == sorted(f"features_{i}" for i in CONV_INDICES)
    for i in CONV_INDICES:
        np.testing.assert_array_equal(net[f"features_{i}"]["kernel"], sd[f"features.{i}.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(net[f"features_{i}"]["bias"], sd[f"features.{i}.bias"])
        assert net[f"features_{i}"]["kernel"].dtype == np.float32
    shapes = jax.tree.map(lambda s: tuple(s.shape), lpips_param_shapes())
    assert jax.tree.map(np.shape, params) == shapes
    assert lpips_weights.VGG16_STAGES == lpips_model.VGG16_STAGES
    assert [i for i, _, _ in lpips_weights.vgg16_conv_layout()] == list(CONV_INDICES)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("features.10.weight"), r"missing features\.10\.weight"),
        (lambda d: d.update({"features.12.bias": np.zeros(255, np.float32)}), r"features\.12\.bias has shape \(255,\)"),
        (lambda d: d.update({"features.1.weight": np.ones(64, np.float32)}), r"unexpected features\.1\.weight"),
    ],
)
def test_vgg_converter_names_the_bad_key(sd, edit, message):
    broken = dict(sd)
    edit(broken)
    with pytest.raises(ValueError, match=message):
        vgg16_params_from_state_dict(broken)


def test_heads_converter_reads_both_layouts():
    heads = shipped_heads()
    lpips_layout = {f"lin{k}.model.1.weight": v.reshape(1, -1, 1, 1) for k, v in enumerate(heads.values())}
    a, b = lpips_heads_from_state_dict(heads), lpips_heads_from_state_dict(lpips_layout)
    for k, c in enumerate(LPIPS_CHANNELS):
        assert a[f"lin{k}"]["kernel"].shape == (1, 1, c, 1)
        np.testing.assert_array_equal(a[f"lin{k}"]["kernel"], b[f"lin{k}"]["kernel"])
    with pytest.raises(ValueError, match="missing lin3"):
        lpips_heads_from_state_dict({k: v for k, v in heads.items() if k != "lin3"})
    with pytest.raises(ValueError, match=r"lin2 has shape \(128,\)"):
        lpips_heads_from_state_dict(dict(heads, lin2=np.ones(128, np.float32)))


def test_loader_reads_safetensors_and_npz(sd, params, tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    save_file(sd, str(tmp_path / "vgg16.safetensors"))
    np.savez(tmp_path / "vgg16.npz", **sd)
    lpips_layout = {f"lin{k}.model.1.weight": v.reshape(1, -1, 1, 1) for k, v in enumerate(shipped_heads().values())}
    np.savez(tmp_path / "heads.npz", **lpips_layout)
    for loaded in (
        load_lpips_params(str(tmp_path / "vgg16.safetensors")),
        load_lpips_params(str(tmp_path / "vgg16.npz"), str(tmp_path / "heads.npz")),
    ):
        jax.tree.map(np.testing.assert_array_equal, loaded, params)

    with pytest.raises(ValueError, match="vgg_path is empty"):
        load_lpips_params("")
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_lpips_params(str(tmp_path / "nowhere.safetensors"))
    (tmp_path / "vgg16.txt").write_text("x")
    with pytest.raises(ValueError, match=r"vgg16\.txt: unknown LPIPS weight file type"):
        load_lpips_params(str(tmp_path / "vgg16.txt"))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"broken\.npz: not a readable \.npz"):
        load_lpips_params(str(tmp_path / "broken.npz"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"not json")
    with pytest.raises(ValueError, match=r"broken\.safetensors: safetensors could not read it"):
        load_lpips_params(str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match=r"heads\.npz \(VGG16 trunk\).*missing features\.0\.weight"):
        load_lpips_params(str(tmp_path / "heads.npz"))
    (tmp_path / "vgg16.pth").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # as where torch is not installed
    with pytest.raises(ImportError, match=r"vgg16\.pth: .*torch is not importable.*\.safetensors"):
        load_lpips_params(str(tmp_path / "vgg16.pth"))


# ---- parity with PyTorch -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(sd, tmp_path_factory):
    """Runs the oracle once: distances for every pair, the original heads if available, and our loader on .pth
    files torch.save wrote (in the reference environment, which has torch)."""
    d = tmp_path_factory.mktemp("lpips")
    pairs = {"images": (images(1), images(2)), "small": (images(3, SMALL), images(4, SMALL))}
    np.savez(d / "vgg.npz", **sd)
    np.savez(d / "inputs.npz", **{f"x{j}_{name}": pair[j] for name, pair in pairs.items() for j in (0, 1)})
    spec = {
        "vgg": str(d / "vgg.npz"),
        "heads": SHIPPED_HEADS_PATH,
        "inputs": str(d / "inputs.npz"),
        "outputs": str(d / "outputs.npz"),
        "pth": str(d / "vgg16.pth"),
        "full_pth": str(d / "lpips_full.pth"),
        "bad_pth": str(d / "corrupt.pth"),
        "original_heads": os.environ.get("LDM_JAX_LPIPS_WEIGHTS", ""),
    }
    with open(d / "spec.json", "w") as f:
        json.dump(spec, f)
    run_reference(ORACLE, str(d / "spec.json"))
    return pairs, dict(np.load(d / "outputs.npz"))


def test_matches_pytorch_reference(reference, params):
    pairs, out = reference
    for name, (x0, x1) in pairs.items():
        np.testing.assert_allclose(np.asarray(distance(params, x0, x1)), out[f"dist_{name}"], rtol=1e-5, err_msg=name)


def digest(a) -> str:
    """As the oracle's: sha256 of dtype, shape and bytes."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def test_loader_reads_torch_saved_files(reference, params):
    """load_lpips_params run in the reference environment on a torchvision-style .pth (classifier included) and on
    an lpips LPIPS.state_dict() .pth gives bit for bit the tree it gives here from .npz."""
    _, out = reference
    want = {"/".join(p.key for p in path): digest(v) for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for prefix in ("pth__", "full__"):
        loaded = {k[len(prefix) :]: str(v) for k, v in out.items() if k.startswith(prefix)}
        assert loaded == want, prefix
    assert "corrupt.pth: torch.load(weights_only=True) could not read it" in str(out.get("bad_pth_error"))


# ---- the shipped heads -------------------------------------------------------------------------------------------


def test_shipped_heads_are_lpips_v01_vgg():
    heads = shipped_heads()
    assert sorted(heads) == [f"lin{k}" for k in range(5)]
    for k, c in enumerate(LPIPS_CHANNELS):
        w = heads[f"lin{k}"]
        assert w.shape == (c,) and w.dtype == np.float32
        assert (w >= 0).all()  # lpips clamps the heads non-negative while training them
        assert hashlib.sha256(w.astype("<f4").tobytes()).hexdigest() == PUBLISHED_HEADS_SHA256[k], f"lin{k}"


def test_shipped_heads_equal_the_original_file(reference):
    _, out = reference
    if "orig_lin0" not in out:
        pytest.skip("LDM_JAX_LPIPS_WEIGHTS not set: the shipped heads are checked against pinned hashes only")
    for k, w in enumerate(shipped_heads().values()):
        np.testing.assert_array_equal(w, out[f"orig_lin{k}"])


# ---- what the autoencoder loss relies on -------------------------------------------------------------------------


def test_gradients_reach_the_images_only(params):
    x, y = images(7), images(8)

    # The params go in as an argument of the jitted step, as in a training step; stop_gradient freezes them.
    @jax.jit
    def grads(params, x, y):
        return jax.grad(lambda p, x: lpips_distance(p, x, y).sum(), argnums=(0, 1))(params, x)

    g_params, g_x = grads(params, x, y)
    assert g_x.shape == x.shape and np.isfinite(g_x).all() and float(jnp.abs(g_x).max()) > 0
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_params))


def test_normalisation_has_finite_gradients_where_features_are_zero():
    """A pixel whose channels are all zero after the ReLU (common in deep layers of small images) must not turn the
    gradient into NaN; the derivative of x / (|x| + eps) there is I / eps."""
    x = np.zeros((1, 2, 1, 4), np.float32)
    x[0, 0, 0] = [3.0, 0.0, -4.0, 0.0]
    out = jax.jit(lpips_model.normalize_channels)(x)
    np.testing.assert_allclose(out[0, :, 0], [[0.6, 0, -0.8, 0], [0, 0, 0, 0]], rtol=1e-6)
    jac = jax.jit(jax.jacobian(lambda v: lpips_model.normalize_channels(v[None, None, None])[0, 0, 0]))(np.zeros(4))
    np.testing.assert_allclose(jac, np.eye(4) / lpips_model.EPS, rtol=1e-6)


def test_identity_is_zero_and_more_distortion_is_further(params):
    x = images(9)
    noise = np.random.default_rng(10).standard_normal(x.shape).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(distance(params, x, x)), 0.0)
    both = np.stack([x[0], x[0]])
    d = np.asarray(distance(params, both, np.clip(both + np.array([0.05, 0.5])[:, None, None, None] * noise, -1, 1)))
    assert 0 < d[0] < d[1]


def test_module_runs_in_bfloat16(params):
    x0, x1 = images(1, SMALL), images(2, SMALL)
    exact = distance(params, x0, x1)
    low = jax.jit(lambda p, a, b: LPIPS(dtype=jnp.bfloat16).apply({"params": p}, a, b))(params, x0, x1)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, exact, rtol=0.05)
