"""Process-wide JAX settings, applied by every entry point (and the tests) before any computation."""

from __future__ import annotations

from typing import Callable


def configure(attention_impl: str = "auto", compilation_cache_dir: str = "", conv_impl: str = "auto") -> None:
    """Applies ldm_jax's JAX settings; idempotent. Call after ``jax.distributed`` is initialised (it asks for the
    backend).

    Threefry's "partitionable" mode (JAX's default) makes XLA:CPU compile ``jax.random.normal`` on
    multi-dimensional shapes about 20x slower (3.7 s vs 0.15 s for one (3, 3, 16, 16) draw on our 2-core CI
    machine): a tiny autoencoder's jitted init took 60 s to compile instead of 5 s, and every train step pays it
    for its noise draws. So on CPU the classic mode is used: it draws the same values whatever the device count or
    mesh (the 8-vs-1 device test checks this for our train step), computing a sharded draw whole before slicing.
    On accelerators that whole draw is what must be avoided (on a pod every device would draw the global noise
    tensor, and FSDP init would build every parameter whole), and the partitionable mode, which draws each shard
    where it lives, stays; its values are as independent of the mesh, but differ from the CPU mode's.

    ``attention_impl`` selects the attention implementation (``ldm_jax.models.attention``), ``conv_impl`` that of
    the 3x3 convolutions (``ldm_jax.models.conv``).
    ``compilation_cache_dir`` turns on JAX's persistent compilation cache there ("" leaves JAX's setting, e.g.
    ``JAX_COMPILATION_CACHE_DIR``): a restarted job (a preempted sampling job, a resumed run) loads its compiled
    programs instead of compiling them again.
    """
    import jax

    from ldm_jax.models import attention, conv

    jax.config.update("jax_threefry_partitionable", jax.default_backend() != "cpu")
    if attention_impl == "splash" and attention.splash_refusal():  # refused before anything loads
        raise ValueError(attention.splash_refusal())
    attention.set_implementation(attention_impl)
    conv.set_implementation(conv_impl)
    use_compilation_cache(compilation_cache_dir)


# Why a job's processes may not share XLA's persistent compilation cache, or None. Module-level so that the tests'
# executable sharing (tests/compile_sharing.py), which gives every process the same loaded bytes, can lift it.
def cache_refusal() -> str | None:
    import jax

    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        return (
            "the persistent compilation cache is off in a multi-process CPU job: on the CPU backend each process "
            "keys its programs by its own host and only process 0 writes, so a restarted job's process 0 loads its "
            "programs while the others compile theirs, and since jaxlib 0.12.1 a loaded XLA:CPU program and a "
            "compiled one wait forever in their first cross-process all-reduce"
        )
    return None


def use_compilation_cache(cache_dir: str = "", min_compile_time_secs: float | None = None) -> None:
    """Points JAX's persistent compilation cache at ``cache_dir`` ("" keeps JAX's own setting, e.g.
    ``JAX_COMPILATION_CACHE_DIR``), unless ``cache_refusal`` says this job cannot use it: then the cache is turned off,
    whoever set it, with a warning that says why. Call after ``jax.distributed`` is initialised and before the
    first compile (JAX decides once whether a process uses the cache)."""
    import jax
    from absl import logging

    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        if min_compile_time_secs is not None:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_secs)
    if not jax.config.jax_compilation_cache_dir or not jax.config.jax_enable_compilation_cache:
        return
    refusal = cache_refusal()
    if refusal:
        logging.warning("%s (%s)", refusal, jax.config.jax_compilation_cache_dir)
        jax.config.update("jax_enable_compilation_cache", False)


def define_flags() -> Callable[[], None]:
    """Defines ``--attention_impl``, ``--conv_impl`` and ``--compilation_cache_dir`` for an entry point (call at
    its module level, once); returns the function its ``main`` calls, after ``jax.distributed`` is initialised and
    before any JAX computation, to ``configure``."""
    from absl import app, flags

    from ldm_jax.models import conv
    from ldm_jax.models.attention import IMPLEMENTATIONS

    impl = flags.DEFINE_enum(
        "attention_impl",
        "auto",
        IMPLEMENTATIONS,
        "Attention implementation: 'auto' (cuDNN fused attention on GPUs for half-precision inputs it takes, "
        "else 'xla'), 'xla' (ldm_jax's einsum formulation), 'cudnn' (required; an error where cuDNN cannot run "
        "it), 'splash' (TPU only: the Pallas splash-attention kernel), 'jax' (jax.nn.dot_product_attention's XLA "
        "path). An execution setting: results agree to rounding.",
    )

    conv_impl = flags.DEFINE_enum(
        "conv_impl",
        "auto",
        conv.IMPLEMENTATIONS,
        "3x3 convolution implementation: 'auto' (one matmul over the nine shifted inputs where XLA:CPU's "
        "convolution is slower: the deepest, smallest ones; else 'xla'), 'xla', 'matmul' "
        "(every stride-1 3x3 convolution). An execution setting: results agree to rounding.",
    )
    cache = flags.DEFINE_string(
        "compilation_cache_dir",
        "",
        "Persistent XLA compilation cache directory (default: $JAX_COMPILATION_CACHE_DIR, else off): a restarted "
        "job loads its compiled programs instead of compiling them again.",
    )

    def configure_from_flags() -> None:
        try:
            configure(impl.value, cache.value, conv_impl.value)
        except ValueError as e:
            raise app.UsageError(str(e)) from e

    return configure_from_flags
