"""Fréchet Inception Distance as pytorch-fid computes it (the numbers the LDM paper reports), in JAX.

The feature network is the "FID Inception": InceptionV3 as in TensorFlow's 2015-12-05 graph
(``inception-2015-12-05.tgz``), which pytorch-fid ports to torchvision's ``Inception3`` layout with three patched
block types. It differs from torchvision's ImageNet InceptionV3 in its weights and in its pooling:

- InceptionA / InceptionC / first InceptionE (Mixed_5b-d, Mixed_6b-e, Mixed_7b): the branch-pool average pool
  (3x3, stride 1, pad 1) divides by the number of *real* pixels in the window (TensorFlow's SAME average pool),
  not by 9;
- second InceptionE (Mixed_7c): the branch pool is a 3x3 *max* pool (stride 1, pad 1);
- the classifier has 1008 classes: the FID does not use it; the Inception Score does, as torch-fidelity's
  ``logits_unbiased`` (pool3 features times ``fc.weight``, no bias; :func:`inception_logits_unbiased`), with the
  weights :func:`load_fid_inception` keeps when asked (``classifier=True``).

Input pipeline (pytorch-fid's ``InceptionV3`` with ``resize_input=True, normalize_input=True``): images in [0, 1]
are resized to 299x299 with bilinear interpolation, half-pixel centres and no antialiasing
(``F.interpolate(mode="bilinear", align_corners=False)``), mapped to [-1, 1] by ``2 x - 1``, and the features are
the 2048-d global average pool of Mixed_7c ("pool3").

Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a torch state dict) is supplied by the user; we
never download. Read it with :func:`load_fid_inception`, which takes .safetensors / .npz anywhere and the .pth
itself where torch is importable (through ``ldm_jax.interop.weight_files``, the reader every importer uses). For
machines without torch, convert it once in any Python with torch and safetensors with this command
(``weight_files.TORCH_TO_SAFETENSORS_PY``; the error a .pth raises without torch prints it whole, paths filled in)::

    python -c "import sys, torch, safetensors.torch as st; ..." IN.pth OUT.safetensors

Statistics: :class:`FeatureStatistics` accumulates the mean and (unbiased, ``np.cov``) covariance of features batch
by batch; :func:`frechet_distance` compares two (mu, sigma) pairs in float64 with scipy's ``sqrtm`` and pytorch-fid's
handling of a singular product and of a spurious imaginary part. For rFID of an autoencoder, the "generated" set is
the reconstructions of the same real images whose statistics form the reference.
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from ldm_jax import storage
from ldm_jax.interop.weight_files import read_state_dict

FEATURE_DIM = 2048
DEFAULT_RESIZE = 299
# The smallest input the stride-2 stages leave at least one pixel for (torchvision's "min_size": 75).
MIN_RESIZE = 75
# torchvision's BasicConv2d: BatchNorm2d(eps=0.001), TensorFlow's value.
BN_EPS = 1e-3
# The 1008-way classifier of the TF graph: pytorch-fid's checkpoint holds it; the features do not use it, the
# Inception Score does (loaded with ``classifier=True``).
NUM_CLASSES = 1008
# pytorch-fid's ``calculate_frechet_distance`` default: added to both covariance diagonals when the product is
# singular.
FRECHET_EPS = 1e-6

# The weight file types load_fid_inception takes.
FID_WEIGHT_SUFFIXES = (".safetensors", ".npz", ".pth", ".pt", ".bin")

Params = dict[str, Any]


# --------------------------------------------------------------------------------------------------- network


class BasicConv(nn.Module):
    """torchvision's BasicConv2d: bias-free conv, eval-mode BatchNorm (eps 1e-3), ReLU. [N, H, W, Cin] -> [N, H',
    W', features].

    Params mirror the torch module (``conv.weight`` -> ``kernel`` [kh, kw, Cin, Cout]; ``bn.weight / bias /
    running_mean / running_var`` -> ``scale / bias / mean / var`` [Cout]). The BatchNorm is folded into the
    conv at call time: one affine per output channel is cheaper on the kernel than on every activation, and the
    difference from normalising after the conv is float32 rounding.
    """

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)  # (H, W), as torch's ``padding=``
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        # Initialisers only give the params their shapes (real values come from the checkpoint); float32 even
        # under jax_enable_x64.
        f32 = jnp.float32
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel, cin, self.features), f32)
        scale = self.param("scale", nn.initializers.ones, (self.features,), f32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), f32)
        mean = self.param("mean", nn.initializers.zeros, (self.features,), f32)
        var = self.param("var", nn.initializers.ones, (self.features,), f32)
        s = scale * jax.lax.rsqrt(var + BN_EPS)
        y = jax.lax.conv_general_dilated(
            x,
            (kernel * s).astype(x.dtype),
            window_strides=(self.stride, self.stride),
            padding=[(self.padding[0], self.padding[0]), (self.padding[1], self.padding[1])],
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )
        return jax.nn.relu(y + (bias - mean * s))


def _avg_pool_real_pixels(x):
    """3x3 / stride 1 / pad 1 average over the pixels inside the image (TensorFlow SAME; torch's
    ``count_include_pad=False``): the FID Inception's pooling in A, C and the first E block."""
    # flax divides by a pooled array of ones in the default float dtype: float64 under jax_enable_x64.
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False).astype(x.dtype)


def _max_pool_valid(x):
    """3x3 / stride 2 max pool without padding (the stem and the B / D reduction blocks)."""
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    """Mixed_5b-d: [N, 35, 35, C] -> [N, 35, 35, 224 + pool_features] at 299 input."""

    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_real_pixels(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction): [N, 35, 35, 288] -> [N, 17, 17, 768] at 299 input."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b-e (factorised 7x7): [N, 17, 17, 768] -> [N, 17, 17, 768] at 299 input."""

    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_real_pixels(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction): [N, 17, 17, 768] -> [N, 8, 8, 1280] at 299 input."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b / 7c (expanded filter bank): [N, 8, 8, C] -> [N, 8, 8, 2048] at 299 input.

    ``max_pool_branch``: the FID graph's Mixed_7c pools its branch_pool input with a 3x3 max (Mixed_7b averages
    over real pixels).
    """

    max_pool_branch: bool = False
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.max_pool_branch:
            # Padding enters a max pool as -inf, as torch's max_pool2d pads.
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_real_pixels(x)
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """The FID Inception trunk: [N, H, W, 3] in [-1, 1] (already resized) -> pool3 features [N, 2048].

    Submodule names are torchvision's ``Inception3`` attribute names, so the params tree reads like the torch
    state dict (see :func:`fid_inception_params_from_state_dict`).
    """

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        p = self.precision
        x = BasicConv(32, (3, 3), stride=2, precision=p, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
        x = _max_pool_valid(x)
        x = BasicConv(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
        x = _max_pool_valid(x)
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name="Mixed_6d")(x)
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE(max_pool_branch=False, precision=p, name="Mixed_7b")(x)
        x = InceptionE(max_pool_branch=True, precision=p, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))  # adaptive average pool to 1x1


# ---------------------------------------------------------------------------------------------- input pipeline


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's bilinear resize along one axis (``align_corners=False``, no antialias).

    Source coordinate of output pixel o: ``scale * (o + 0.5) - 0.5`` with ``scale = in / out``, clamped below at 0;
    it mixes pixels floor(src) and floor(src) + 1 (the last pixel repeats at the far edge). Computed in float32,
    as torch's kernel does for float32 images.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = np.minimum(i0 + 1, in_size - 1)
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), 1 - lam)
    np.add.at(m, (rows, i1), lam)
    return m


def _resize_bilinear(x, size: int, precision):
    """[N, H, W, C] -> [N, size, size, C], torch ``F.interpolate(mode="bilinear", align_corners=False)``."""
    mh = jnp.asarray(_bilinear_matrix(x.shape[1], size))
    mw = jnp.asarray(_bilinear_matrix(x.shape[2], size))
    x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=precision)
    return jnp.einsum("pw,nowc->nopc", mw, x, precision=precision)


@functools.partial(jax.jit, static_argnames=("resize_to", "precision"))
def _preprocess(images, resize_to, precision):
    """[N, H, W, 3] uint8 or [-1, 1] float -> [N, resize_to, resize_to, 3] float32 in [-1, 1]."""
    if images.dtype == jnp.uint8:
        # pytorch-fid's loader: ToTensor (x / 255), resize in [0, 1], then 2 x - 1.
        x = images.astype(jnp.float32) / 255.0
        return 2.0 * _resize_bilinear(x, resize_to, precision) - 1.0
    # Already in [-1, 1]: the bilinear resize commutes with the affine map, so resize directly.
    return _resize_bilinear(images.astype(jnp.float32), resize_to, precision)


# Jitted apart from the preprocessing: images of any size and dtype share one compiled network per batch size.
@functools.partial(jax.jit, static_argnames=("precision",))
def _network(params, x, precision):
    return FIDInceptionV3(precision=precision).apply({"params": params}, x)


def inception_features(
    params: Params, images, *, resize_to: int = DEFAULT_RESIZE, precision=jax.lax.Precision.HIGHEST
) -> jax.Array:
    """pool3 features [N, 2048] (float32) of RGB images [N, H, W, 3], any H and W.

    ``images``: uint8 in [0, 255] (what pytorch-fid reads from image files; use this to match it on saved
    samples), or floating point in [-1, 1] (the model's own range), taken as is: neither clipped nor quantised, so
    it matches pytorch-fid fed the float images ``(x + 1) / 2``, not their 8-bit PNGs (clip, round to uint8 and
    pass that to measure what a PNG-based evaluation measures). ``resize_to``: the square side the images are
    resized to; 299 is the FID definition, smaller sides (>= 75) exist for tests. ``precision``: of the convs and
    the resize; HIGHEST keeps true float32 arithmetic on GPUs/TPUs, whose default may use TF32 / bf16 passes.

    Jitted: the network compiles once per (batch size, resize_to), the resize once per input shape and dtype.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"inception_features: images of shape {images.shape}; expected [N, H, W, 3] RGB")
    if images.dtype != jnp.uint8 and not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"inception_features: images of dtype {images.dtype}; expected uint8 or float in [-1, 1]")
    if resize_to < MIN_RESIZE:
        raise ValueError(f"inception_features: resize_to={resize_to}; the network needs at least {MIN_RESIZE}")
    # The trunk alone: params with or without the classifier then share one compiled network.
    trunk = {k: v for k, v in params.items() if k != "fc"}
    return _network(trunk, _preprocess(images, resize_to, precision), precision)


def inception_logits_unbiased(params: Params, features, *, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """torch-fidelity's ``logits_unbiased`` [N, 1008] (float32), the Inception Score's input: pool3 ``features``
    [N, 2048] times the classifier's weight, *without* its bias (``features @ fc.weight.T``), as torch-fidelity's
    "inception-v3-compat" extractor computes them.

    ``params``: loaded with ``classifier=True`` (:func:`load_fid_inception`), so that they hold ``params["fc"]``.
    """
    if "fc" not in params:
        raise ValueError(
            "inception_logits_unbiased: params without the classifier ('fc'); load them with "
            "load_fid_inception(path, classifier=True)"
        )
    features = jnp.asarray(features, jnp.float32)
    if features.ndim != 2 or features.shape[1] != FEATURE_DIM:
        raise ValueError(f"inception_logits_unbiased: features of shape {features.shape}; expected [N, {FEATURE_DIM}]")
    return jnp.matmul(features, jnp.asarray(params["fc"]["kernel"], jnp.float32), precision=precision)


# ------------------------------------------------------------------------------------------------------ weights

# torch BatchNorm tensor name suffix -> our BasicConv param name (the conv's ``conv.weight`` is our ``kernel``).
_BN_NAMES = {"bn.weight": "scale", "bn.bias": "bias", "bn.running_mean": "mean", "bn.running_var": "var"}
# Keys of pytorch-fid's checkpoint the features do not use: the classifier, kept only with ``classifier=True``.
_UNUSED_KEYS = ("fc.weight", "fc.bias")


@functools.lru_cache(maxsize=1)
def _param_shapes() -> dict[str, tuple[int, ...]]:
    """Our params, flattened to "Block/conv/param" -> shape (traced, not computed, at the smallest input)."""
    shapes = jax.eval_shape(
        FIDInceptionV3().init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, MIN_RESIZE, MIN_RESIZE, 3), jnp.float32)
    )["params"]
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        flat["/".join(k.key for k in path)] = tuple(leaf.shape)
    return flat


def fid_inception_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The torch state-dict keys the FID Inception needs -> their torch shapes (conv weights [Cout, Cin, kh, kw]).

    pytorch-fid's checkpoint also holds ``fc.weight`` [1008, 2048], ``fc.bias`` [1008] (read only with
    ``classifier=True``) and, when saved by a newer torch, ``*.bn.num_batches_tracked``; those are accepted and
    ignored.
    """
    out = {}
    for name, shape in _param_shapes().items():
        module, leaf = name.rsplit("/", 1)
        prefix = module.replace("/", ".")
        if leaf == "kernel":
            kh, kw, cin, cout = shape
            out[f"{prefix}.conv.weight"] = (cout, cin, kh, kw)
        else:
            torch_leaf = next(k for k, v in _BN_NAMES.items() if v == leaf)
            out[f"{prefix}.{torch_leaf}"] = shape
    return out


def fid_inception_params_from_state_dict(sd: Mapping[str, Any], *, classifier: bool = False) -> Params:
    """pytorch-fid's FID Inception state dict (names as in torchvision's ``Inception3``, e.g.
    ``Mixed_7c.branch_pool.conv.weight``; values array-likes) -> our params tree of float32 numpy arrays.

    Conv weights [Cout, Cin, kh, kw] become kernels [kh, kw, Cin, Cout]; BatchNorm tensors map by name. Raises
    ValueError naming every missing, mis-shaped or unexpected key; a 1000-class ``fc.weight`` or ``AuxLogits.*``
    keys mean torchvision's ImageNet InceptionV3, whose pooling and weights are not the FID ones.

    ``classifier``: also keep the 1008-class classifier as ``params["fc"]`` = ``{"kernel": fc.weight.T [2048,
    1008], "bias": fc.bias [1008]}`` (flax ``Dense`` layout), for :func:`inception_logits_unbiased`; both keys are
    then required. Without it the tree holds the trunk only, as :func:`fid_inception_state_dict_shapes` lists.
    """
    expected = fid_inception_state_dict_shapes()
    given = {k: np.asarray(v) for k, v in sd.items()}
    missing = sorted(set(expected) - set(given))
    wrong = sorted(
        f"{k}: {tuple(given[k].shape)} (expected {expected[k]})"
        for k in expected
        if k in given and tuple(given[k].shape) != expected[k]
    )
    unexpected = sorted(
        k for k in given if k not in expected and k not in _UNUSED_KEYS and not k.endswith(".num_batches_tracked")
    )
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if wrong:
        problems.append(f"mis-shaped keys {wrong}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if "fc.weight" in given and tuple(given["fc.weight"].shape) != (NUM_CLASSES, FEATURE_DIM):
        problems.append(
            f"fc.weight of shape {tuple(given['fc.weight'].shape)}: the FID Inception has a {NUM_CLASSES}-class "
            "classifier (torchvision's ImageNet InceptionV3 has 1000 classes and is not the FID network)"
        )
    if classifier:
        absent = [k for k in _UNUSED_KEYS if k not in given]
        if absent:
            problems.append(f"classifier=True but no classifier keys {absent}")
        elif tuple(given["fc.bias"].shape) != (NUM_CLASSES,):
            problems.append(f"fc.bias of shape {tuple(given['fc.bias'].shape)} (expected ({NUM_CLASSES},))")
    if problems:
        raise ValueError("FID Inception state dict: " + "; ".join(problems))

    params: Params = {}
    for key in expected:
        value = given[key].astype(np.float32)
        prefix, leaf = (key.rsplit(".", 2)[0], "kernel") if key.endswith(".conv.weight") else key.rsplit(".bn.", 1)
        if leaf == "kernel":
            value = value.transpose(2, 3, 1, 0)
        else:
            leaf = _BN_NAMES["bn." + leaf]
        node = params
        for part in prefix.split("."):
            node = node.setdefault(part, {})
        node[leaf] = value
    if classifier:
        params["fc"] = {
            "kernel": given["fc.weight"].astype(np.float32).T.copy(),
            "bias": given["fc.bias"].astype(np.float32),
        }
    return params


def load_fid_inception(path: str, *, classifier: bool = False) -> Params:
    """Reads pytorch-fid's FID Inception weights (``pt_inception-2015-12-05-6726825d.pth`` or its conversion to
    .safetensors / .npz, same key names) -> params on the default device, for :func:`inception_features`; with
    ``classifier=True`` they also hold ``params["fc"]`` (``kernel`` [2048, 1008], ``bias`` [1008]) for
    :func:`inception_logits_unbiased` (the Inception Score), and a file without ``fc.weight`` / ``fc.bias`` is an
    error.

    Raises ``weight_files.WeightFileError`` (a ``ValueError``) for a file that cannot be read, and ``ValueError``
    naming the keys for one that does not hold the FID Inception."""
    # allow_pickle: pytorch-fid publishes a .pth, which the user names. No .ckpt: that is a training checkpoint,
    # never these weights, and refusing it by extension says so more plainly than a list of missing keys.
    sd = read_state_dict(path, allow_pickle=True, suffixes=FID_WEIGHT_SUFFIXES, what="FID Inception weight file")
    return jax.device_put(fid_inception_params_from_state_dict(sd, classifier=classifier))


# --------------------------------------------------------------------------------------------------- statistics


class StatisticsState(NamedTuple):
    """The exact sufficient statistics of a :class:`FeatureStatistics`, as plain arrays (a pytree): ``count`` [] int64,
    ``shift`` [D], ``sum`` [D] = sum(x - shift), ``outer`` [D, D] = sum((x - shift)(x - shift)^T), float64. An empty
    one has count 0 and zero arrays."""

    count: np.ndarray
    shift: np.ndarray
    sum: np.ndarray
    outer: np.ndarray


class FeatureStatistics:
    """Streaming mean and covariance of feature rows: ``update`` with [n, D] batches, then ``mean()`` [D] and
    ``covariance()`` [D, D] (unbiased, as ``np.cov(rowvar=False)``), both float64. Memory is O(D^2) whatever the
    number of images.

    Sums are of rows minus the first batch's mean (a fixed shift): the covariance is shift-invariant, and
    centring keeps ``sum(x x^T) - n mu mu^T`` from cancelling away digits when the mean is large against the spread.

    Across hosts: each host accumulates its own rows; ``state()`` gives the sums, and :meth:`pooled` (or
    :meth:`merge`) combines the states of every host into the statistics of all rows exactly (the sums re-centred on a
    common shift, never averaged covariances), in the same bits on every host that pools the same states in the
    same order. Gather the float64 arrays bit-exactly: ``multihost_utils.process_allgather`` without
    ``jax_enable_x64`` would cast them to float32 (gather ``a.view(np.int32)`` and view the result back).
    """

    def __init__(self, dim: int = FEATURE_DIM):
        self.dim = dim
        self.count = 0
        self._shift = None
        self._sum = np.zeros(dim, np.float64)
        self._outer = np.zeros((dim, dim), np.float64)

    def update(self, features) -> None:
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"FeatureStatistics.update: features of shape {f.shape}; expected [n, {self.dim}]")
        if not len(f):
            return
        if self._shift is None:
            self._shift = f.mean(axis=0)
        d = f - self._shift
        self.count += len(f)
        self._sum += d.sum(axis=0)
        self._outer += d.T @ d

    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("FeatureStatistics.mean: no features were added")
        return self._shift + self._sum / self.count

    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"FeatureStatistics.covariance: {self.count} feature rows; need at least 2")
        centred_sum = self._sum / self.count
        return (self._outer - self.count * np.outer(centred_sum, centred_sum)) / (self.count - 1)

    def state(self) -> StatisticsState:
        """Copies of the sums (see :class:`StatisticsState`), to send to the host that pools them."""
        shift = np.zeros(self.dim, np.float64) if self._shift is None else self._shift.copy()
        return StatisticsState(np.asarray(self.count, np.int64), shift, self._sum.copy(), self._outer.copy())

    @classmethod
    def pooled(cls, states) -> FeatureStatistics:
        """The statistics of all rows behind ``states`` (a sequence of :class:`StatisticsState` or
        :class:`FeatureStatistics`, or one :class:`StatisticsState` stacked on a leading host axis, as an
        all-gather returns it).

        Each state's sums are re-centred exactly on the pooled mean: with ``delta = shift_i - c``,
        ``sum(x - c) = sum_i + n_i delta`` and ``sum((x - c)(x - c)^T) = outer_i + sum_i delta^T + delta sum_i^T +
        n_i delta delta^T``. Centring on the mean itself, not on one host's shift, keeps hosts whose rows differ
        widely (sorted or class-split data) from cancelling digits in the covariance.
        """
        if isinstance(states, StatisticsState):
            count = np.asarray(states.count)
            states = (
                [StatisticsState(*(np.asarray(a)[i] for a in states)) for i in range(len(count))]
                if count.ndim == 1
                else [states]
            )
        parts = [
            s.state()
            if isinstance(s, FeatureStatistics)
            else StatisticsState(np.asarray(s[0]), *(np.asarray(a, np.float64) for a in s[1:]))
            for s in states
        ]
        if not parts:
            raise ValueError("FeatureStatistics.pooled: no states to pool")
        dim = parts[0].sum.shape[0] if parts[0].sum.ndim == 1 else -1
        for i, p in enumerate(parts):
            shapes = (p.count.shape, p.shift.shape, p.sum.shape, p.outer.shape)
            if shapes != ((), (dim,), (dim,), (dim, dim)) or int(p.count) < 0:
                raise ValueError(
                    f"FeatureStatistics.pooled: state {i} has count {p.count} and shapes {shapes[1:]} (count, shift, "
                    f"sum, outer); expected a count >= 0 and ({dim},), ({dim},), ({dim}, {dim}) like state 0"
                )
        parts = [p for p in parts if int(p.count) > 0]
        out = cls(dim)
        if not parts:
            return out
        n = sum(int(p.count) for p in parts)
        # The pooled mean, each host's own mean (shift + sum / count) weighted by its count.
        centre = sum(int(p.count) * (p.shift + p.sum / int(p.count)) for p in parts) / n
        for p in parts:
            delta = p.shift - centre
            out._sum += p.sum + int(p.count) * delta
            cross = np.outer(p.sum, delta)
            out._outer += p.outer + cross + cross.T + int(p.count) * np.outer(delta, delta)
        out.count = n
        out._shift = centre
        return out

    def merge(self, other: FeatureStatistics | StatisticsState) -> None:
        """Adds the rows behind ``other`` (statistics or a state from another host) to these, exactly."""
        pooled = FeatureStatistics.pooled([self, other])  # checks other's shapes against ours (state 0)
        self.count, self._shift, self._sum, self._outer = pooled.count, pooled._shift, pooled._sum, pooled._outer


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Writes (mu [D], sigma [D, D]) in pytorch-fid's ``--save-stats`` .npz layout (keys ``mu``, ``sigma``)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    storage.write_bytes(path, buffer.getvalue())  # whole or not at all, local or gs://


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads (mu, sigma) from a pytorch-fid statistics .npz (keys ``mu``, ``sigma``), e.g. a reference set's."""
    with storage.open_read(path) as raw, np.load(raw, allow_pickle=False) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise ValueError(f"FID statistics {path!r}: keys {f.files}; expected 'mu' and 'sigma'")
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = FRECHET_EPS) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))``, in float64.

    As pytorch-fid: when ``sqrtm`` of the product is not finite (a singular product), ``eps`` is added to both
    diagonals and it is retried; a complex square root whose diagonal has an imaginary part above 1e-3 is an error,
    a smaller one is numerical noise and dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"frechet_distance: means of shapes {mu1.shape} and {mu2.shape}; expected equal [D]")
    if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"frechet_distance: covariances of shapes {sigma1.shape} and {sigma2.shape}; expected {mu1.shape * 2}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"frechet_distance: singular covariance product; adding {eps} to the diagonals", stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"frechet_distance: sqrtm(sigma1 sigma2) has an imaginary part up to {np.max(np.abs(covmean.imag))}"
                " on its diagonal (allowed: 1e-3)"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
