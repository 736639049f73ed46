"""KID and Inception Score against torch-fidelity 0.4.0's own metric functions (run in the reference environment),
their invariants, the FID Inception's logits head, and exactly pooled feature statistics."""

import json
import os

import numpy as np
import pytest

from ldm_jax.evaluation import fid, inception_score, kid
from tests.reference_env import ROOT, run_reference

ORACLE = os.path.join(ROOT, "tests", "reference", "kid_is_oracle.py")

# (name, set a, set b, our kwargs; the oracle gets them under torch-fidelity's names)
KID_CASES = [
    ("kid_small", "f300", "g250", {"subsets": 7, "subset_size": 100, "seed": 0}),
    # torch-fidelity's default seed and kernel; a subset as large as the smaller set (every row drawn).
    ("kid_default_seed", "f300", "g250", {"subsets": 5, "subset_size": 250}),
    ("kid_kernel_args", "g250", "f300", {"subsets": 4, "subset_size": 60, "seed": 3, "degree": 2, "gamma": 0.05}),
    ("kid_coef0", "f300", "g250", {"subsets": 3, "subset_size": 80, "seed": 1, "coef0": 0.5}),
]
_KID_NAMES = {
    "subsets": "kid_subsets",
    "subset_size": "kid_subset_size",
    "seed": "rng_seed",
    "degree": "kid_kernel_poly_degree",
    "gamma": "kid_kernel_poly_gamma",
    "coef0": "kid_kernel_poly_coef0",
}
IS_CASES = [
    ("is_default", "logits500", {}),
    ("is_seed_splits", "logits500", {"splits": 7, "seed": 3}),
    ("is_no_shuffle", "logits500", {"splits": 3, "shuffle": False}),
]
_IS_NAMES = {"splits": "isc_splits", "shuffle": "samples_shuffle", "seed": "rng_seed"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Seeded feature sets and logits, and torch-fidelity's KID / IS of them (one oracle run)."""
    d = tmp_path_factory.mktemp("kid_is")
    rng = np.random.default_rng(0)
    arrays = {
        "f300": rng.normal(size=(300, 64)),
        # Another distribution (shifted, wider): a KID well away from 0, so relative errors mean something.
        "g250": 0.3 + 1.2 * rng.normal(size=(250, 64)),
        "logits500": 3.0 * rng.normal(size=(500, fid.NUM_CLASSES)),
        "f99": rng.normal(size=(99, 64)),
    }
    np.savez(d / "inputs.npz", **arrays)
    kid_cases = [
        {"name": name, "a": a, "b": b, "kwargs": {_KID_NAMES[k]: v for k, v in kw.items()}}
        for name, a, b, kw in KID_CASES
    ]
    # torch-fidelity's handling of a set smaller than the subset size.
    kid_cases.append({"name": "kid_too_few", "a": "f99", "b": "f300", "kwargs": {"kid_subset_size": 100}})
    is_cases = [
        {"name": name, "logits": x, "kwargs": {_IS_NAMES[k]: v for k, v in kw.items()}} for name, x, kw in IS_CASES
    ]
    fid_cases = [{"name": "fid_small", "a": "f300", "b": "g250"}]
    spec = {"inputs": str(d / "inputs.npz"), "outputs": str(d / "outputs.json"), "kid": kid_cases, "isc": is_cases}
    spec["fid"] = fid_cases
    (d / "spec.json").write_text(json.dumps(spec))
    run_reference(ORACLE, str(d / "spec.json"))
    return arrays, json.loads((d / "outputs.json").read_text())


def _assert_close(ours, theirs, rtol=1e-10):
    assert ours.mean == pytest.approx(theirs["mean"], rel=rtol, abs=0)
    assert ours.std == pytest.approx(theirs["std"], rel=rtol, abs=0)


@pytest.mark.parametrize("case", KID_CASES, ids=[c[0] for c in KID_CASES])
def test_kid_matches_torch_fidelity(reference, case):
    arrays, want = reference
    name, a, b, kwargs = case
    got = kid.kernel_inception_distance(arrays[a], arrays[b], **kwargs)
    assert want[name]["mean"] > 1e-3  # clearly different sets: a relative comparison is meaningful
    _assert_close(got, want[name])


@pytest.mark.parametrize("case", IS_CASES, ids=[c[0] for c in IS_CASES])
def test_inception_score_matches_torch_fidelity(reference, case):
    arrays, want = reference
    name, x, kwargs = case
    _assert_close(inception_score.inception_score(arrays[x], **kwargs), want[name])


def test_fid_of_streamed_statistics_matches_torch_fidelity(reference):
    """Our FID (pytorch-fid's sqrtm formula) of statistics accumulated batch by batch equals torch-fidelity's
    (eigenvalues of sigma1 sigma2, np.cov statistics) on the same feature sets."""
    arrays, want = reference
    stats = []
    for name in ("f300", "g250"):
        s = fid.FeatureStatistics(64)
        for chunk in np.array_split(arrays[name], 7):
            s.update(chunk)
        stats.append(s)
    got = fid.frechet_distance(stats[0].mean(), stats[0].covariance(), stats[1].mean(), stats[1].covariance())
    assert want["fid_small"]["fid"] > 1.0
    assert got == pytest.approx(want["fid_small"]["fid"], rel=1e-9)


def test_kid_invariants_and_errors(reference):
    arrays, want = reference
    # torch-fidelity refuses a set smaller than the subset size with a ValueError; so do we, naming the argument.
    assert want["kid_too_few"]["error"].startswith("ValueError")
    with pytest.raises(ValueError, match=r"subset_size=100 but the feature sets have 99 and 300 rows"):
        kid.kernel_inception_distance(arrays["f99"], arrays["f300"], subset_size=100)
    with pytest.raises(ValueError, match="subset_size=1; the unbiased estimator"):
        kid.kernel_inception_distance(arrays["f99"], arrays["f99"], subset_size=1)
    with pytest.raises(ValueError, match=r"shapes \(99, 64\) and \(300, 32\)"):
        kid.kernel_inception_distance(arrays["f99"], arrays["f300"][:, :32], subset_size=10)

    # Two independent samples of one distribution: the unbiased estimate is ~0 (either sign), tiny against the KID
    # of the shifted set.
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(2000, 64)), rng.normal(size=(2000, 64))
    same = kid.kernel_inception_distance(x, y, subsets=10, subset_size=200)
    assert abs(same.mean) < 3 * same.std / np.sqrt(10) + 1e-12
    assert abs(same.mean) < 0.02 * want["kid_small"]["mean"]
    # Symmetric in the kernel (the subsets drawn differ when the sets swap, so compare one full-set subset each).
    ab = kid.kernel_inception_distance(arrays["f300"][:250], arrays["g250"], subsets=1, subset_size=250)
    ba = kid.kernel_inception_distance(arrays["g250"], arrays["f300"][:250], subsets=1, subset_size=250)
    assert ab.mean == pytest.approx(ba.mean, rel=1e-12) and ab.std == 0.0


def test_inception_score_invariants():
    # Uniform predictions: p(y|x) = p(y), IS 1. Confident predictions spread evenly over k classes: IS k.
    assert inception_score.inception_score(np.zeros((40, 10))).mean == pytest.approx(1.0, abs=1e-12)
    k = 8
    onehot = 50.0 * np.eye(k)[np.tile(np.arange(k), 5)]
    score = inception_score.inception_score(onehot, splits=5, shuffle=False)
    assert score.mean == pytest.approx(k, rel=1e-9) and score.std < 1e-9
    with pytest.raises(ValueError, match="3 rows of logits for splits=10"):
        inception_score.inception_score(np.zeros((3, 10)))


def test_logits_head_and_classifier_loading(tmp_path, monkeypatch):
    """The loader keeps the 1008-class classifier when asked; the head is pool3 @ fc.weight.T, no bias."""
    rng = np.random.default_rng(2)
    sd = {k: np.zeros(shape, np.float32) for k, shape in fid.fid_inception_state_dict_shapes().items()}
    weight = rng.normal(size=(fid.NUM_CLASSES, fid.FEATURE_DIM)).astype(np.float32)
    bias = rng.normal(size=fid.NUM_CLASSES).astype(np.float32)
    np.savez(tmp_path / "w.npz", **sd, **{"fc.weight": weight, "fc.bias": bias})

    trunk = fid.load_fid_inception(str(tmp_path / "w.npz"))
    params = fid.load_fid_inception(str(tmp_path / "w.npz"), classifier=True)
    assert "fc" not in trunk and set(params) == set(trunk) | {"fc"}
    np.testing.assert_array_equal(params["fc"]["kernel"], weight.T)
    np.testing.assert_array_equal(params["fc"]["bias"], bias)

    features = np.abs(rng.normal(size=(5, fid.FEATURE_DIM))).astype(np.float32)
    got = np.asarray(fid.inception_logits_unbiased(params, features))
    want = features.astype(np.float64) @ weight.T.astype(np.float64)
    assert got.shape == (5, fid.NUM_CLASSES) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

    with pytest.raises(ValueError, match="classifier=True"):
        fid.inception_logits_unbiased(trunk, features)
    with pytest.raises(ValueError, match=r"features of shape \(5, 64\)"):
        fid.inception_logits_unbiased(params, features[:, :64])
    with pytest.raises(ValueError, match=r"no classifier keys \['fc\.weight', 'fc\.bias'\]"):
        fid.fid_inception_params_from_state_dict(sd, classifier=True)

    # The network sees the trunk only: params with and without the classifier share one compiled program.
    seen = []
    monkeypatch.setattr(fid, "_network", lambda p, x, precision: seen.append(set(p)))
    fid.inception_features(params, np.zeros((1, 80, 80, 3), np.uint8), resize_to=fid.MIN_RESIZE)
    assert seen == [set(trunk)]


def _split_stats(parts, dim):
    out = []
    for part in parts:
        s = fid.FeatureStatistics(dim)
        for batch in np.array_split(part, 3):  # several updates per host, some of them empty
            s.update(batch)
        out.append(s)
    return out


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("split", ["random", "sorted", "far_apart"])
def test_pooled_statistics_equal_all_rows(split):
    """Statistics accumulated on several "hosts" and pooled (sums re-centred, never averaged covariances) equal
    those of all rows, whatever the split: uneven, empty or single-row parts, and parts whose shifts differ
    widely."""
    rng = np.random.default_rng(3)
    dim = 12
    rows = 1e3 + rng.normal(size=(157, dim)) * rng.uniform(0.1, 3, dim)  # a large mean against the spread
    if split == "far_apart":
        rows[:60] -= 2e3  # two hosts' data far apart: shifts 2e3 apart against a unit spread
    if split in ("sorted", "far_apart"):
        rows = rows[np.argsort(rows[:, 0])]  # hosts holding different kinds of rows
    cuts = [0, 0, 1, 40, 41, 100, 157] if split != "random" else sorted(rng.integers(0, 158, 5))
    parts = [rows[a:b] for a, b in zip([0, *cuts], [*cuts, len(rows)], strict=True)]
    hosts = _split_stats(parts, dim)
    mean, cov = rows.mean(axis=0), np.cov(rows, rowvar=False)

    pooled = fid.FeatureStatistics.pooled([h.state() for h in hosts])
    assert pooled.count == len(rows)
    assert _rel(pooled.mean(), mean) < 1e-12 and _rel(pooled.covariance(), cov) < 1e-12
    # The same from an all-gather-like stack of the states, and merging one host at a time.
    stacked = fid.StatisticsState(*(np.stack(a) for a in zip(*[h.state() for h in hosts], strict=True)))
    np.testing.assert_array_equal(fid.FeatureStatistics.pooled(stacked).covariance(), pooled.covariance())
    merged = fid.FeatureStatistics(dim)
    for h in hosts:
        merged.merge(h.state())
    assert merged.count == len(rows)
    assert _rel(merged.mean(), mean) < 1e-12 and _rel(merged.covariance(), cov) < 1e-12
    # The state is the sums themselves: a round trip through it is exact.
    again = fid.FeatureStatistics.pooled([pooled.state()])
    np.testing.assert_array_equal(again.covariance(), pooled.covariance())

    with pytest.raises(ValueError, match=r"state 1 has count 3 and shapes \(\(5,\), \(5,\), \(5, 5\)\)"):
        fid.FeatureStatistics.pooled([hosts[0], fid.StatisticsState(3, np.zeros(5), np.zeros(5), np.zeros((5, 5)))])
    assert fid.FeatureStatistics.pooled([fid.FeatureStatistics(dim)]).count == 0
