"""Multi-head scaled dot-product attention, and which implementation computes it.

Implementations (``--attention_impl``, or ``set_implementation``), all computing the same function:

xla     ldm_jax's einsum formulation: the query is scaled before the first product (a [B, Tq, D] multiply instead
        of one over the [B, heads, Tq, Tk] scores), scores and softmax in float32, probabilities cast back to the
        value dtype. On XLA:CPU this is 5-6x faster than ``jax.nn.dot_product_attention``'s XLA path for a 32x32
        self-attention (measured in benchmarks/peers.py's model: the UNet forward's main cost).
cudnn   ``jax.nn.dot_product_attention(implementation="cudnn")``: cuDNN's fused flash attention on NVIDIA GPUs; it
        never writes the scores to memory. cuDNN takes float16/bfloat16 inputs, head sizes that are multiples of 8
        up to 256, and no mask; anything else is refused by name when asked for explicitly.
splash  the TPU Pallas splash-attention kernel that ships with JAX (``jax.experimental.pallas.ops.tpu``): flash
        attention in VMEM tiles, scores never written to HBM, with its own backward kernels. Sequences are padded
        to multiples of 128 (padded keys masked by segment ids) and head sizes to multiples of 128 (zero columns
        change no score), as TPU tiles require; the batch is split over the mesh by ``shard_map`` (a Pallas
        kernel is not partitioned by XLA). Asked for on another backend it is refused by name, except through
        ``set_implementation("splash", interpret=True)``, which runs the same kernel in Pallas's interpreter on any
        backend: the tests check it there against the float64 definition, whole models and 8 devices included.
jax     ``jax.nn.dot_product_attention`` with no implementation named (JAX's XLA path), kept for comparison.
auto    (default) cudnn on a GPU backend for inputs cuDNN takes, xla otherwise (on TPU too: splash is opt-in
        until it has been measured on TPU hardware, which this project has not had).

The choice is a process-wide execution setting, not part of a model's config: it changes neither parameters nor
(beyond float rounding) results, and a checkpoint trained with one samples with any other. It is read when a
function is traced, so set it before the first jit (every entry point does, through ``jax_setup.configure``).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "jax")
_current = {"impl": "auto", "interpret": False}


def set_implementation(name: str, *, interpret: bool = False) -> None:
    """Selects the implementation for functions traced from now on (see the module docstring).

    ``interpret`` (splash only) runs the Pallas kernel in Pallas's interpreter, on any backend: for tests.
    """
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"--attention_impl={name!r}: must be one of {IMPLEMENTATIONS}")
    if interpret and name != "splash":
        raise ValueError(f"interpret=True applies to the 'splash' implementation, not {name!r}")
    _current["impl"] = name
    _current["interpret"] = interpret


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
# longer a training residual), and orders every product so that no operand of that size is transposed. On CPU
# both the forward and the backward work through a few (batch x head) slices at a time, so that their score-sized
# temporaries stay in the cache.
_CPU_CHUNK_BYTES = 4 << 20  # float32 score bytes per step on CPU (one 1024x1024 slice): stays in L3
_BATCH_DIMS = ((0,), (0,))


def _over_queries(big, small):
    """[n, Tq, Tk] x [n, Tq, D] contracted over Tq -> [n, Tk, D], with the small operand on the left so that XLA
    reads the score-sized one in its own layout (then a transpose of the small result)."""
    out = jax.lax.dot_general(small, big, (((1,), (1,)), _BATCH_DIMS))  # [n, D, Tk]
    return jnp.swapaxes(out, 1, 2)


def _scores(q, k):
    return jax.lax.dot_general(q, k, (((2,), (2,)), _BATCH_DIMS), preferred_element_type=jnp.float32)


# float32 lanes of an AVX-512 vector (two AVX2 ones): product columns are computed in tiles of this width on CPU
_SUM_COLUMN_TILE = 16


def _forward(q, k, v):
    """Attention output and log-sum-exp (the training forward; inference keeps the output), normalised after the
    product with v.

    Dividing the [Tq, D] output by the row sums instead of the [Tq, Tk] probabilities saves a pass over the
    score-sized tensor. Where the head size leaves room in its vector tile (D % 16 != 0: the small peer UNet's 8,
    Stable Diffusion's 40), the row sums come out of that same product, from a column of ones appended to v, which
    saves the separate reduction too. Measured on a 32x1024x1024 slice walk (one slice per step, under load): head
    size 8: divide-then-product 48-50 ms, product-then-divide 41 ms, with the ones column 37 ms; 40: 72 / 63 / 61 ms;
    16 and 64 (no room): 52 / 42 ms and 93 / 81 ms, where a ones column (a whole extra tile) measured slower.
    """
    s = _scores(q, k)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m).astype(v.dtype)
    d = v.shape[-1]
    product = (((2,), (1,)), _BATCH_DIMS)
    if d % _SUM_COLUMN_TILE:
        shape = v.shape[:-1]
        pad = -(d + 1) % _SUM_COLUMN_TILE
        ones = jnp.concatenate([v, jnp.ones((*shape, 1), v.dtype), jnp.zeros((*shape, pad), v.dtype)], axis=-1)
        both = jax.lax.dot_general(e, ones, product, preferred_element_type=jnp.float32)
        o, l = both[..., :d], both[..., d : d + 1]  # noqa: E741
    else:
        o = jax.lax.dot_general(e, v, product, preferred_element_type=jnp.float32)
        l = jnp.sum(e, axis=-1, keepdims=True, dtype=jnp.float32)  # noqa: E741
    return (o / l).astype(v.dtype), (m + jnp.log(l))[..., 0]


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


def slice_plan(heads: int, n: int, tq: int, tk: int) -> tuple[str, int]:
    """How the xla path's forward and backward walk their n = batch x heads slices: ("whole", n), ("slices",
    slices per step) or ("heads", heads per step).

    On CPU they go a few slices at a time, so that their score-sized temporaries stay in the cache (on accelerators
    a sequential loop would only cost parallelism). Measured on a 32x1024x1024 attention (the small peer UNet's
    32x32 self-attention, batch 4, one device): the backward one slice per step 134-141 ms, the whole at once
    261-329 ms, chunks of queries 266-377 ms; the training forward (which also saves the log-sum-exp) one slice per
    step 23.5 ms, four 21.5 ms, the whole at once 48.7-54.5 ms. On jax 0.12.1 that shortens the peer UNet's AdamW
    step by 6-7% (two compiled copies each way, interleaved in one process: 992 and 1003 ms whole, 933 and 933 ms by
    slices; on 0.12.0.1 the same change had measured within noise). The inference forward stays whole: with no
    log-sum-exp to return, XLA fuses the softmax into the products (11.3 ms whole, 12.2-13.3 ms by slices; the peer
    UNet's forward 174 ms whole, 182 ms by slices).

    With one device the loop takes any slices. With several, the mesh may shard the batch, and a loop over a
    sharded axis makes XLA gather it, so the loop runs over heads only: each step takes every example (each device
    its own rows) and as many heads as fit the budget for a device's share of the batch.
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


def _by_slices(fn, heads, *args):
    """``fn`` (arrays [n, ...] -> a tuple of arrays [n, ...]) applied to ``slice_plan``'s steps in turn; ``args``
    start with the folded queries [n, Tq, d] and keys [n, Tk, d], whose lengths size the plan."""
    n = args[0].shape[0]
    how, size = slice_plan(heads, n, args[0].shape[1], args[1].shape[1])
    if how == "whole":
        return fn(*args)
    if how == "slices":
        steps = jax.lax.map(lambda xs: fn(*xs), tuple(a.reshape(n // size, size, *a.shape[1:]) for a in args))
        return tuple(a.reshape(n, *a.shape[2:]) for a in steps)
    b, g = n // heads, heads // size

    def split(a):  # [b * heads, ...] -> [g, b * size, ...]: step i takes heads [i * size, (i + 1) * size)
        return jnp.moveaxis(a.reshape(b, g, size, *a.shape[1:]), 1, 0).reshape(g, b * size, *a.shape[1:])

    def join(a):
        return jnp.moveaxis(a.reshape(g, b, size, *a.shape[2:]), 0, 1).reshape(n, *a.shape[2:])

    steps = jax.lax.map(lambda xs: fn(*xs), tuple(split(a) for a in args))
    return tuple(join(a) for a in steps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _folded_attention(q, k, v, heads):
    return _forward(q, k, v)[0]  # inference: whole (slice_plan's docstring says why)


def _folded_fwd(q, k, v, heads):
    o, lse = _by_slices(_forward, heads, q, k, v)
    return o, (q, k, v, o, lse)


def _folded_bwd(heads, residuals, do):
    return _by_slices(_backward, heads, *residuals, do)


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


# ---- splash: the TPU Pallas kernel ----------------------------------------------------------------------------------
_TPU_TILE = 128  # TPU lanes: the kernel's sequence blocks and the head size are padded to multiples of this


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _splash_kernel(heads: int, tq: int, tk: int, interpret: bool):
    """The kernel for [heads, tq, D] x [heads, tk, D] (tq, tk multiples of 128): the largest of 512/256/128 that
    divides each length as its block (bigger blocks amortise the per-block softmax bookkeeping)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    def block(n):
        return next(b for b in (512, 256, _TPU_TILE) if n % b == 0)

    bq, bkv = block(tq), block(tk)
    sizes = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    mask = splash_mask.MultiHeadMask([splash_mask.FullMask((tq, tk)) for _ in range(heads)])
    return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret), splash


def _splash_local(q, k, v, *, heads: int, tk: int, interpret: bool):
    """One device's share: q [b, Tq', D] (scaled), k, v [b, Tk', D], sequences padded to 128 with ``tk`` real keys."""
    b, tq_pad, d = q.shape
    tk_pad = k.shape[1]
    head_dim = d // heads
    head_pad = _round_up(head_dim, _TPU_TILE) - head_dim

    def split(x):  # [b, t, D] -> [b, heads, t, head_dim padded with zero columns]
        x = x.reshape(b, x.shape[1], heads, head_dim).transpose(0, 2, 1, 3)
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, head_pad))) if head_pad else x

    kernel, splash = _splash_kernel(heads, tq_pad, tk_pad, interpret)
    segments = None
    if tk_pad != tk:  # padded keys get their own segment, which no query belongs to
        segments = splash.SegmentIds(q=jnp.zeros((tq_pad,), jnp.int32), kv=(jnp.arange(tk_pad) >= tk).astype(jnp.int32))
    out = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=segments))(split(q), split(k), split(v))
    out = out[..., :head_dim].transpose(0, 2, 1, 3)
    return out.reshape(b, tq_pad, d)


def splash_refusal() -> str:
    """Why the splash kernel cannot run compiled here ("" on TPU); Pallas's interpreter runs it anywhere."""
    if jax.default_backend() == "tpu":
        return ""
    return (
        f"--attention_impl='splash': a TPU Pallas kernel, and the backend is {jax.default_backend()!r}; "
        "use 'auto' (cudnn on GPU, xla elsewhere)"
    )


def _splash_attention(q, k, v, heads):
    interpret = _current["interpret"]
    why = "" if interpret else splash_refusal()
    if why:
        raise ValueError(why)
    b, tq, d = q.shape
    tk = k.shape[1]
    q = q * jnp.asarray((d // heads) ** -0.5, q.dtype)
    tq_pad, tk_pad = _round_up(tq, _TPU_TILE), _round_up(tk, _TPU_TILE)
    q = jnp.pad(q, ((0, 0), (0, tq_pad - tq), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, tk_pad - tk), (0, 0))) for x in (k, v))
    local = functools.partial(_splash_local, heads=heads, tk=tk, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        if jax.device_count() == 1:
            return local(q, k, v)[:, :tq].astype(v.dtype)
        # Our meshes (training/sharding.py) lay every device out in jax.devices() order and split the batch over
        # all of them, so one flat axis over the same devices is the batch layout the caller already has.
        mesh = Mesh(np.asarray(jax.devices()), ("devices",))
    # A Pallas kernel is one device's program: shard_map runs it on each device's rows. A batch the devices do not
    # divide (a sampler's odd last batch) is computed whole on every device, which is correct, only redundant.
    spec = P(tuple(mesh.axis_names)) if b % mesh.size == 0 else P()
    out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
    return out[:, :tq].astype(v.dtype)


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
    if impl == "splash" and mask is None:  # the text encoder's causal attention takes the general path
        return _splash_attention(q, k, v, heads)
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
