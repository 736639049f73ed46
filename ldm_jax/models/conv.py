"""How a 3x3 convolution is computed: XLA's convolution, or one matrix product over its 9 shifted inputs.

Implementations (``--conv_impl``, or ``set_implementation``), all computing the same function:

xla     ``lax.conv_general_dilated``: what XLA's backend does for convolutions.
matmul  for a stride-1 3x3 "SAME" convolution, the input padded once, its nine shifted views side by side in the
        channel axis ([B, H, W, 9 Cin], im2col) and one [B H W, 9 Cin] x [9 Cin, Cout] product. Measured on this
        2-core CPU, batch 2: 1280 channels at 8x8 take 22.9 ms this way and 64.1 ms through XLA:CPU's convolution;
        640 at 16x16 20.0 vs 25.8 ms; but 320 at 32x32 34.4 vs 19.5 ms, and small-channel convolutions are slower
        too (the 9x larger operand no longer pays for itself). Other convolutions (strided, 1x1, padded by hand)
        use XLA's.
auto    (default) matmul on the CPU backend where it wins there at batch 2 and 8 alike (at least 512 input
        channels at 8x8 or fewer positions, at least 1024 at 16x16 or fewer: the SD UNet's deepest levels, where
        PyTorch's oneDNN convolutions were 1.5-1.6x XLA:CPU's), xla otherwise (GPU and TPU convolutions are the
        vendors' kernels).

Like the attention implementation, it is a process-wide execution setting, read when a function is traced; it
changes neither parameters nor (beyond float rounding) results. Flax's ``nn.Conv`` takes the function through its
``conv_general_dilated`` field, so parameter names, shapes and initialisation are nn.Conv's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("auto", "xla", "matmul")
_current = {"impl": "auto"}
# auto's rule on CPU, (at most this many positions, at least this many input channels) pairs; measured at batch 2
# and 8: 1280 channels win at 16x16 (93 vs 149 ms, 435 vs 565 ms) and at 8x8 (22 vs 68, 105 vs 240), 512 at 8x8
# (3.8 vs 4.2, 15 vs 23); 640 at 16x16 wins at batch 2 (21 vs 28) but loses at 8 (126 vs 100), 320 at 16x16 loses.
_AUTO_RULES = ((8 * 8, 512), (16 * 16, 1024))


def set_implementation(name: str) -> None:
    """Selects the convolution implementation for functions traced from now on (see the module docstring)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"--conv_impl={name!r}: must be one of {IMPLEMENTATIONS}")
    _current["impl"] = name


def implementation() -> str:
    return _current["impl"]


def _is_nhwc_hwio(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    lhs, rhs, out = dimension_numbers
    return tuple(lhs) == (0, 3, 1, 2) and tuple(rhs) == (3, 2, 0, 1) and tuple(out) == (0, 3, 1, 2)


def _takes_matmul(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups) -> bool:
    """Whether this convolution is a stride-1 3x3 "SAME" NHWC one that the matmul form computes."""
    ones = (None, (1, 1), [1, 1])
    same = padding == "SAME" or (not isinstance(padding, str) and [tuple(p) for p in padding] == [(1, 1), (1, 1)])
    return (
        lhs.ndim == 4
        and tuple(rhs.shape[:2]) == (3, 3)
        and tuple(window_strides) == (1, 1)
        and same
        and lhs_dilation in ones
        and rhs_dilation in ones
        and groups == 1
        and _is_nhwc_hwio(dimension_numbers)
    )


def _wins_on_this_backend(lhs) -> bool:
    _, h, w, c = lhs.shape
    return jax.default_backend() == "cpu" and any(h * w <= p and c >= n for p, n in _AUTO_RULES)


def matmul_conv3x3(x: jax.Array, kernel: jax.Array, precision=None) -> jax.Array:
    """A stride-1 3x3 "SAME" convolution of NHWC ``x`` with an HWIO ``kernel`` as one matrix product (im2col)."""
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # Tap (i, j) in row-major order, matching kernel.reshape(9 * Cin, Cout)'s row order.
    cols = jnp.concatenate([xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-1)
    out = jnp.dot(cols.reshape(b * h * w, 9 * c), kernel.reshape(9 * c, -1), precision=precision)
    return out.reshape(b, h, w, -1)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    **kwargs,
):
    """``lax.conv_general_dilated`` with the implementation ``set_implementation`` chose (nn.Conv's hook)."""
    impl = _current["impl"]
    if impl != "xla" and not kwargs:
        takes = _takes_matmul(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                              feature_group_count)  # fmt: skip
        if takes and (impl == "matmul" or _wins_on_this_backend(lhs)):
            return matmul_conv3x3(lhs, rhs, precision)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        **kwargs,
    )
