"""Random inpainting masks for training mask-conditioned models, drawn on the device inside the train step.

Stable Diffusion's inpainting models were trained on synthetic masks and, a quarter of the time, on a mask that covers
the whole image (so the model keeps its text-to-image ability). Here a mask is the union of 1..``max_boxes`` axis-
aligned boxes whose sides are uniform in [``min_fraction``, ``max_fraction``] of the image side, or the full image
with probability ``full_prob``. 1 marks pixels to repaint, 0 pixels to keep.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_box_masks(
    rng: jax.Array,
    batch: int,
    size: int,
    max_boxes: int = 3,
    min_fraction: float = 0.1,
    max_fraction: float = 0.6,
    full_prob: float = 0.25,
) -> jax.Array:
    """float32 masks [batch, size, size, 1] in {0, 1}."""
    k_n, k_hw, k_pos, k_full = jax.random.split(rng, 4)
    n = jax.random.randint(k_n, (batch, 1), 1, max_boxes + 1)
    sides = jax.random.uniform(k_hw, (batch, max_boxes, 2), minval=min_fraction, maxval=max_fraction) * size
    sides = jnp.maximum(jnp.round(sides), 1.0)
    corners = jax.random.uniform(k_pos, (batch, max_boxes, 2)) * (size - sides)
    corners = jnp.floor(corners)
    pix = jnp.arange(size, dtype=jnp.float32)
    # [B, boxes, size] along each axis, then the outer product is the box.
    inside_y = (pix >= corners[..., :1]) & (pix < corners[..., :1] + sides[..., :1])
    inside_x = (pix >= corners[..., 1:]) & (pix < corners[..., 1:] + sides[..., 1:])
    boxes = inside_y[..., :, None] & inside_x[..., None, :]
    used = jnp.arange(max_boxes)[None, :] < n  # [B, boxes]
    mask = jnp.any(boxes & used[..., None, None], axis=1)
    full = jax.random.bernoulli(k_full, full_prob, (batch, 1, 1))
    return (mask | full).astype(jnp.float32)[..., None]


def box_mask(size: int, top: int, left: int, height: int, width: int) -> jax.Array:
    """float32 [size, size, 1]: 1 inside the box (rows ``top``.., columns ``left``..), 0 elsewhere."""
    pix = jnp.arange(size)
    rows = (pix >= top) & (pix < top + height)
    cols = (pix >= left) & (pix < left + width)
    return (rows[:, None] & cols[None, :]).astype(jnp.float32)[..., None]
