"""FID: the FID Inception against a PyTorch transcription of pytorch-fid's, the weight converter, the Fréchet
distance against closed forms, and the streaming statistics against numpy."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from ldm_jax.evaluation import fid
from ldm_jax.interop import weight_files
from tests.reference_env import ROOT, run_reference

ORACLE = os.path.join(ROOT, "tests", "reference", "fid_oracle.py")
# Small enough for a fast CPU test, large enough for every stage (75 is the minimum): 107 -> 2x2 after Mixed_7a.
TEST_SIZE = 107


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Seeded random FID Inception weights and pool3 features of two images from the PyTorch reference."""
    d = tmp_path_factory.mktemp("fid")
    rng = np.random.default_rng(0)
    # 120 -> 107 rows is a downsample, 90 -> 107 columns an upsample: both resize directions are exercised.
    images = rng.integers(0, 256, (2, 120, 90, 3)).astype(np.uint8)
    np.savez(d / "inputs.npz", images=images)
    spec = {
        "seed": 0,
        "size": TEST_SIZE,
        "inputs": str(d / "inputs.npz"),
        "outputs": str(d / "outputs.npz"),
        "weights_npz": str(d / "weights.npz"),
        "weights_pth": str(d / "weights.pth"),
        # The conversion command the .pth error message prints, run on the oracle's .pth in the torch env.
        "convert_command": weight_files.TORCH_TO_SAFETENSORS_PY,
        "converted": str(d / "converted.safetensors"),
    }
    (d / "spec.json").write_text(json.dumps(spec))
    run_reference(ORACLE, str(d / "spec.json"))
    with np.load(spec["weights_npz"]) as f:
        sd = {k: f[k] for k in f.files}
    return {"dir": d, "images": images, "sd": sd, "features": np.load(spec["outputs"])["features"], **spec}


def test_features_match_pytorch_fid(reference):
    params = fid.load_fid_inception(reference["weights_npz"])
    want = reference["features"]
    assert want.shape == (2, fid.FEATURE_DIM)
    # Random weights calibrated on the images: the features are O(1) and mostly non-zero.
    assert 0.1 < np.abs(want).mean() < 10 and (want > 0).mean() > 0.5
    # The same images as floats in [-1, 1] give the same features up to rounding.
    as_float = reference["images"].astype(np.float32) / 127.5 - 1.0
    for images in (reference["images"], as_float):
        err = np.asarray(fid.inception_features(params, images, resize_to=TEST_SIZE)) - want
        # Aggregate, not per-element, bounds: this random network amplifies float32 rounding (torch's own float32
        # and float64 features differ by 1.4e-4 relative); in float64 both implementations agree to 1e-13.
        assert np.linalg.norm(err) / np.linalg.norm(want) < 1e-4
        assert np.abs(err).max() < 1e-4 * np.abs(want).max()


def test_resize_matches_torch_bilinear_weights():
    """Spot values of torch's align_corners=False bilinear weights: identity at equal size, the half-pixel
    offsets of a 2x upsample (with the clamped first row), and a 2x downsample averaging pixel pairs."""
    np.testing.assert_array_equal(fid._bilinear_matrix(5, 5), np.eye(5))
    up = fid._bilinear_matrix(2, 4)
    np.testing.assert_allclose(up, [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    down = fid._bilinear_matrix(4, 2)
    np.testing.assert_allclose(down, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])


def test_converter_is_exact_and_names_bad_keys(reference):
    sd = reference["sd"]
    params = fid.fid_inception_params_from_state_dict(sd)
    expected = fid.fid_inception_state_dict_shapes()
    # The oracle's torch modules name and shape every tensor the network needs; fc and num_batches_tracked extra.
    assert set(expected) == {k for k in sd if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    bn_names = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
    for key in expected:
        path, leaf = key.rsplit(".", 1)
        parts = path.split(".")
        node = params
        for part in parts[:-1]:
            node = node[part]
        if parts[-1] == "conv":
            np.testing.assert_array_equal(node["kernel"], sd[key].transpose(2, 3, 1, 0))
        else:
            np.testing.assert_array_equal(node[bn_names[leaf]], sd[key])
    assert len(jax.tree_util.tree_leaves(params)) == len(expected)

    missing = {k: v for k, v in sd.items() if k != "Mixed_6c.branch7x7dbl_3.bn.running_var"}
    with pytest.raises(ValueError, match=r"missing keys \['Mixed_6c\.branch7x7dbl_3\.bn\.running_var'\]"):
        fid.fid_inception_params_from_state_dict(missing)
    bad = dict(sd, **{"Mixed_7c.branch_pool.conv.weight": np.zeros((192, 2048, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"Mixed_7c\.branch_pool\.conv\.weight: \(192, 2048, 3, 3\)"):
        fid.fid_inception_params_from_state_dict(bad)
    extra = dict(sd, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected keys \['AuxLogits\.fc\.weight'\]"):
        fid.fid_inception_params_from_state_dict(extra)
    imagenet = dict(sd, **{"fc.weight": np.zeros((1000, 2048), np.float32), "fc.bias": np.zeros(1000, np.float32)})
    with pytest.raises(ValueError, match="1008-class"):
        fid.fid_inception_params_from_state_dict(imagenet)


def test_weight_files(reference):
    """The conversion command's .safetensors (the oracle ran it in the torch env on its .pth) loads to the same
    params as the original weights; without torch a .pth is refused with that command in the message."""
    want = fid.fid_inception_params_from_state_dict(reference["sd"])
    converted = jax.device_get(fid.load_fid_inception(reference["converted"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, converted, want)
    if importlib.util.find_spec("torch") is None:
        with pytest.raises(ValueError, match="Convert it once") as err:
            fid.load_fid_inception(reference["weights_pth"])
        assert weight_files.TORCH_TO_SAFETENSORS_PY in str(err.value)
    else:
        from_pth = jax.device_get(fid.load_fid_inception(reference["weights_pth"]))
        jax.tree_util.tree_map(np.testing.assert_array_equal, from_pth, want)
    with pytest.raises(ValueError, match="no such file"):
        fid.load_fid_inception(str(reference["dir"] / "absent.safetensors"))
    (reference["dir"] / "w.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="extension '.ckpt'"):
        fid.load_fid_inception(str(reference["dir"] / "w.ckpt"))


def test_input_validation():
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        fid.inception_features({}, np.zeros((1, 80, 80, 1), np.uint8))
    with pytest.raises(ValueError, match="int32"):
        fid.inception_features({}, np.zeros((1, 80, 80, 3), np.int32))
    with pytest.raises(ValueError, match="resize_to=64"):
        fid.inception_features({}, np.zeros((1, 80, 80, 3), np.uint8), resize_to=64)


def _random_spd(rng, d, eigenvalues=None):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam = rng.uniform(0.1, 2.0, d) if eigenvalues is None else eigenvalues
    return q, q @ np.diag(lam) @ q.T


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 2.0, d), rng.uniform(0.1, 2.0, d)
    # Diagonal covariances: per-dimension 1-D Fréchet distances.
    want = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    np.testing.assert_allclose(fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)), want, rtol=1e-10)
    # Covariances sharing eigenvectors (not diagonal): sqrtm(S1 S2) = Q sqrt(L1 L2) Q^T.
    q, c1 = _random_spd(rng, d)
    l2 = rng.uniform(0.1, 2.0, d)
    c2 = q @ np.diag(l2) @ q.T
    l1 = np.diag(q.T @ c1 @ q)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(l1 + l2 - 2 * np.sqrt(l1 * l2))
    np.testing.assert_allclose(fid.frechet_distance(mu1, c1, mu2, c2), want, rtol=1e-10)
    # Scalars: (m1 - m2)^2 + (sqrt v1 - sqrt v2)^2.
    np.testing.assert_allclose(fid.frechet_distance(1.0, 4.0, -2.0, 9.0), 9.0 + 1.0, rtol=1e-12)
    # Identical statistics: 0; general covariances: symmetric and positive.
    _, c3 = _random_spd(rng, d)
    assert abs(fid.frechet_distance(mu1, c3, mu1, c3)) < 1e-10
    ab, ba = fid.frechet_distance(mu1, c1, mu2, c3), fid.frechet_distance(mu2, c3, mu1, c1)
    np.testing.assert_allclose(ab, ba, rtol=1e-10)
    assert ab > 0
    with pytest.raises(ValueError, match=r"means of shapes \(6,\) and \(5,\)"):
        fid.frechet_distance(mu1, c1, mu2[:5], c3)
    with pytest.raises(ValueError, match=r"covariances of shapes \(6, 6\) and \(5, 5\)"):
        fid.frechet_distance(mu1, c1, mu2, c3[:5, :5])


def test_frechet_distance_singular_and_complex_handling(monkeypatch):
    """pytorch-fid's fallbacks: a non-finite sqrtm is retried with eps on both diagonals; a complex result with a
    large imaginary diagonal is an error, a tiny one is dropped."""
    real_sqrtm = fid.linalg.sqrtm
    calls = []

    def non_finite_first(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(fid.linalg, "sqrtm", non_finite_first)
    s1, s2 = np.diag([1.0, 0.0]), np.diag([0.0, 4.0])
    with pytest.warns(UserWarning, match="singular"):
        value = fid.frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
    eps = 1e-6
    np.testing.assert_allclose(calls[1], (s1 + eps * np.eye(2)) @ (s2 + eps * np.eye(2)))
    # The traces are of the given covariances; only the square root sees the offset.
    np.testing.assert_allclose(value, 5.0 - 2 * (np.sqrt((1 + eps) * eps) + np.sqrt(eps * (4 + eps))), rtol=1e-12)

    monkeypatch.setattr(fid.linalg, "sqrtm", lambda a: np.eye(2) + 1e-2j * np.eye(2))
    with pytest.raises(ValueError, match="imaginary"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))
    monkeypatch.setattr(fid.linalg, "sqrtm", lambda a: np.eye(2) + 1e-5j * np.eye(2))
    assert fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2)) == pytest.approx(0.0, abs=1e-12)


def test_streaming_statistics_equal_numpy(tmp_path):
    rng = np.random.default_rng(1)
    # A large mean against a small spread: the case naive sum-of-outer-products loses digits on.
    batches = [(1e3 + rng.normal(size=(n, 16))).astype(np.float32) for n in (5, 1, 0, 12, 7)]
    stats = fid.FeatureStatistics(dim=16)
    for b in batches:
        stats.update(b)
    allf = np.concatenate(batches).astype(np.float64)
    assert stats.count == len(allf)
    np.testing.assert_allclose(stats.mean(), allf.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(stats.covariance(), np.cov(allf, rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"shape \(3, 8\); expected \[n, 16\]"):
        stats.update(np.zeros((3, 8)))
    with pytest.raises(ValueError, match="need at least 2"):
        fresh = fid.FeatureStatistics(dim=16)
        fresh.update(batches[1])
        fresh.covariance()

    fid.save_statistics(str(tmp_path / "s.npz"), stats.mean(), stats.covariance())
    mu, sigma = fid.load_statistics(str(tmp_path / "s.npz"))
    np.testing.assert_array_equal(mu, stats.mean())
    np.testing.assert_array_equal(sigma, stats.covariance())
