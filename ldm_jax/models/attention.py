"""Multi-head scaled dot-product attention, and which implementation computes it.

Implementations (``--attention_impl``, or ``set_implementation``), all computing the same function:

xla     ldm_jax's einsum formulation: the query is scaled before the first product (a [B, Tq, D] multiply instead
        of one over the [B, heads, Tq, Tk] scores), scores and softmax in float32, probabilities cast back to the
        value dtype. On XLA:CPU this is 5-6x faster than ``jax.nn.dot_product_attention``'s XLA path for a 32x32
        self-attention (measured in benchmarks/peers.py's model: the UNet forward's main cost).
cudnn   ``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN's fused flash attention on NVIDIA GPUs; it
        never writes the scores to memory. cuDNN takes float16/bfloat16 inputs, head sizes that are multiples of 8
        up to 256, and no mask; anything else is refused by name when asked for explicitly.
jax     ``jax.nn.dot_product_attention`` with no implementation named (JAX's XLA path), kept for comparison.
auto    (default) cudnn on a GPU backend for inputs cuDNN takes, xla otherwise.

The choice is a process-wide execution setting, not part of a model's config: it changes neither parameters nor
(beyond float rounding) results, and a checkpoint trained with one samples with any other. It is read when a
function is traced, so set it before the first jit (every entry point does, through ``jax_setup.configure``).
A TPU Pallas (splash) kernel is not implemented: on TPU ``auto`` is xla.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "jax")
_current = {"impl": "auto"}


def set_implementation(name: str) -> None:
    """Selects the implementation for functions traced from now on (see the module docstring)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"--attention_impl={name!r}: must be one of {IMPLEMENTATIONS}")
    _current["impl"] = name


def implementation() -> str:
    return _current["impl"]


def cudnn_refusal(q: jax.Array, heads: int, mask: Optional[jax.Array]) -> str:
    """Why cuDNN's fused attention cannot take these inputs ("" when it can)."""
    head_dim = q.shape[-1] // heads
    if jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()!r}, not 'gpu'"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"the inputs are {q.dtype}, cuDNN takes bfloat16 or float16 (set the model dtype)"
    if head_dim % 8 or head_dim > 256:
        return f"head size {head_dim}: cuDNN takes multiples of 8 up to 256"
    if mask is not None:
        return "a mask is given (the text encoder's causal attention)"
    return ""


def _einsum_attention(q, k, v, heads, mask):
    """The masked case (the text encoder's causal attention, 77 tokens): plain einsums, differentiated by JAX."""
    b, tq, d = q.shape
    tk = k.shape[1]
    head_dim = d // heads
    q = (q * jnp.asarray(head_dim**-0.5, q.dtype)).reshape(b, tq, heads, head_dim)
    k = k.reshape(b, tk, heads, head_dim)
    v = v.reshape(b, tk, heads, head_dim)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, tq, d)


# ---- the unmasked XLA path: heads folded into the batch, a hand-written backward ---------------------------------
# Why a custom VJP: JAX's transpose of the attention products gives XLA:CPU contractions over the scores' leading
# axis, which it runs through a full copy of the [heads, Tq, Tk] tensor (a 32x1024x1024 product: 72 ms instead of
# 9 ms), and the softmax backward streams several such tensors through memory. The backward below recomputes the
# probabilities from the saved log-sum-exp (as flash attention does: the [B, heads, Tq, Tk] probabilities are no
# longer a training residual), orders every product so that no operand of that size is transposed, and on CPU
# works through a few (batch x head) slices at a time, so that its score-sized temporaries stay in the cache.
_CPU_CHUNK_BYTES = 4 << 20  # float32 score bytes per backward step on CPU (one 1024x1024 slice): stays in L3
_BATCH_DIMS = ((0,), (0,))


def _over_queries(big, small):
    """[n, Tq, Tk] x [n, Tq, D] contracted over Tq -> [n, Tk, D], with the small operand on the left so that XLA
    reads the score-sized one in its own layout (then a transpose of the small result)."""
    out = jax.lax.dot_general(small, big, (((1,), (1,)), _BATCH_DIMS))  # [n, D, Tk]
    return jnp.swapaxes(out, 1, 2)


def _scores(q, k):
    return jax.lax.dot_general(q, k, (((2,), (2,)), _BATCH_DIMS), preferred_element_type=jnp.float32)


def _forward(q, k, v):
    s = _scores(q, k)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    l = jnp.sum(e, axis=-1, keepdims=True)  # noqa: E741
    o = jax.lax.dot_general((e / l).astype(v.dtype), v, (((2,), (1,)), _BATCH_DIMS))
    return o, (m + jnp.log(l))[..., 0]


def _backward(q, k, v, o, lse, do):
    p = jnp.exp(_scores(q, k) - lse[..., None])
    do32 = do.astype(jnp.float32)
    dp = jax.lax.dot_general(do, v, (((2,), (2,)), _BATCH_DIMS), preferred_element_type=jnp.float32)
    # sum_k p * dp = sum_d do * o: the softmax backward's row term from the small tensors.
    ds = p * (dp - jnp.sum(do32 * o.astype(jnp.float32), axis=-1)[..., None])
    dq = jax.lax.dot_general(ds, k.astype(jnp.float32), (((2,), (1,)), _BATCH_DIMS))
    dk = _over_queries(ds, q.astype(jnp.float32))
    dv = _over_queries(p, do32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _largest_divisor(n: int, fits) -> int:
    return max((c for c in range(1, n + 1) if n % c == 0 and fits(c)), default=1)


def backward_plan(heads: int, n: int, tq: int, tk: int) -> tuple[str, int]:
    """How the xla path's backward walks its n = batch x heads slices: ("whole", n), ("slices", slices per step)
    or ("heads", heads per step).

    On CPU it goes a few slices at a time, so that its score-sized temporaries stay in the cache (on accelerators a
    sequential loop would only cost parallelism). Measured on a 32x1024x1024 backward (the small peer UNet's 32x32
    self-attention, batch 4, one device): one slice per step 134-141 ms, the whole at once 261-329 ms, chunks of
    queries 266-377 ms. With one device the loop takes any slices. With several, the mesh may shard the batch, and
    a loop over a sharded axis makes XLA gather it, so the loop runs over heads only: each step takes every example
    (each device its own rows) and as many heads as fit the budget for a device's share of the batch.
    """
    per_slice = tq * tk * 4
    if jax.default_backend() != "cpu" or n * per_slice <= _CPU_CHUNK_BYTES:
        return "whole", n
    if jax.device_count() == 1:
        chunk = _largest_divisor(n, lambda c: c * per_slice <= _CPU_CHUNK_BYTES)
        return ("whole", n) if chunk == n else ("slices", chunk)
    local = max(1, n // heads // jax.device_count())
    group = _largest_divisor(heads, lambda c: local * c * per_slice <= _CPU_CHUNK_BYTES)
    return ("whole", n) if group == heads else ("heads", group)


def _chunked_backward(heads, q, k, v, o, lse, do):
    n = q.shape[0]
    args = (q, k, v, o, lse, do)
    how, size = backward_plan(heads, n, q.shape[1], k.shape[1])
    if how == "whole":
        return _backward(*args)
    if how == "slices":
        steps = jax.lax.map(lambda xs: _backward(*xs), tuple(a.reshape(n // size, size, *a.shape[1:]) for a in args))
        return tuple(a.reshape(n, *a.shape[2:]) for a in steps)
    b, g = n // heads, heads // size

    def split(a):  # [b * heads, ...] -> [g, b * size, ...]: step i takes heads [i * size, (i + 1) * size)
        return jnp.moveaxis(a.reshape(b, g, size, *a.shape[1:]), 1, 0).reshape(g, b * size, *a.shape[1:])

    def join(a):
        return jnp.moveaxis(a.reshape(g, b, size, *a.shape[2:]), 0, 1).reshape(n, *a.shape[2:])

    steps = jax.lax.map(lambda xs: _backward(*xs), tuple(split(a) for a in args))
    return tuple(join(a) for a in steps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _folded_attention(q, k, v, heads):
    return _forward(q, k, v)[0]


def _folded_fwd(q, k, v, heads):
    o, lse = _forward(q, k, v)
    return o, (q, k, v, o, lse)


def _folded_bwd(heads, residuals, do):
    return _chunked_backward(heads, *residuals, do)


_folded_attention.defvjp(_folded_fwd, _folded_bwd)


def _xla_attention(q, k, v, heads):
    b, tq, d = q.shape
    tk = k.shape[1]
    head_dim = d // heads

    def fold(x, t):
        return x.reshape(b, t, heads, head_dim).transpose(0, 2, 1, 3).reshape(b * heads, t, head_dim)

    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    out = _folded_attention(fold(q, tq), fold(k, tk), fold(v, tk), heads)
    return out.reshape(b, heads, tq, head_dim).transpose(0, 2, 1, 3).reshape(b, tq, d)


def _library_attention(q, k, v, heads, mask, implementation):
    b, tq, d = q.shape
    tk = k.shape[1]
    head_dim = d // heads
    q = q.reshape(b, tq, heads, head_dim)
    k = k.reshape(b, tk, heads, head_dim)
    v = v.reshape(b, tk, heads, head_dim)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return out.reshape(b, tq, d)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, mask: Optional[jax.Array] = None) -> jax.Array:
    """Multi-head scaled dot-product attention.

    Args:
      q: [B, Tq, D]; k, v: [B, Tk, D]; mask: broadcastable to [B, heads, Tq, Tk], True = attend.
    Returns:
      [B, Tq, D] in the dtype of ``v``.
    """
    impl = _current["impl"]
    if impl == "jax":
        return _library_attention(q, k, v, heads, mask, None)
    if impl in ("cudnn", "auto"):
        why = cudnn_refusal(q, heads, mask)
        if not why:
            return _library_attention(q, k, v, heads, mask, "cudnn")
        if impl == "cudnn" and mask is None:
            # The text encoder's masked attention always takes the general path; anything else asked for
            # explicitly must not silently run slower than the user thinks.
            raise ValueError(f"--attention_impl='cudnn': {why}; use 'auto' to fall back to 'xla' there")
    if mask is not None:
        return _einsum_attention(q, k, v, heads, mask)
    return _xla_attention(q, k, v, heads)
