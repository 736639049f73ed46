"""Compile times of the SD-1.5-size programs on this machine, cold and from JAX's persistent compilation cache.

  python -m benchmarks.compile_time [--programs=train_step,sampler] [--latent_size=64] [--cache_dir=DIR]

Programs (abstract arguments: nothing is allocated or run, so the full-size model compiles on a laptop):

  train_step  the SD-1.5 UNet train step of ``benchmarks.memory`` (configs/txt2img.py "sd": AdamW, EMA,
              skip-if-non-finite, epsilon loss on cached latents), float32, no remat, data-parallel over 8 host
              devices, one example per device
  sampler     what ``ldm_jax.sample`` compiles for a txt2img run of that size: DDIM 50 with classifier-free guidance
              (both halves in one batch), a ``lax.scan`` over the 50 UNet calls, one image, one device

Each program is compiled in a fresh process three times: cold (no cache), cold again writing the persistent cache
(``--compilation_cache_dir`` of the entry points), and in a third process reading it back: what a restarted
sampling job or a resumed training run pays. Times are split into trace + lower (Python, JAX) and XLA compile (or
cache load). Prints a markdown table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

# The train step is benchmarks.memory's (its flags, --latent_size among them, are this script's too); importing it
# also gives the process 8 host devices, the mesh that step is compiled for.
from benchmarks import memory

PROGRAMS = ("train_step", "sampler")
_PROGRAMS = flags.DEFINE_list("programs", list(PROGRAMS), f"Which programs, among {PROGRAMS}.")
_LATENT = memory._LATENT_SIZE
_CACHE_DIR = flags.DEFINE_string("cache_dir", "", "Persistent cache folder (default: a fresh temporary one).")
_CHILD = flags.DEFINE_string("child", "", "Internal: compile this program in this process and print JSON.")
_USE_CACHE = flags.DEFINE_bool("use_cache", False, "Internal: the child uses --cache_dir.")


def _sampler(latent: int):
    """(jitted sampler, abstract arguments): the SD-1.5 UNet under guidance in a 50-step DDIM scan."""
    import jax
    import jax.numpy as jnp

    from configs import txt2img
    from ldm_jax.diffusion.guidance import classifier_free_guidance
    from ldm_jax.diffusion.samplers import SamplerOptions, make_sampler, sample
    from ldm_jax.diffusion.schedules import schedule_from_config
    from ldm_jax.models.unet import UNetConfig

    config = txt2img.get_config("sd")
    width = config.text_encoder.width
    unet = UNetConfig.from_config(config.unet, "unet.").build(
        in_channels=4, out_channels=4, context_dim=width, dtype=jnp.float32
    )
    sampler = make_sampler(SamplerOptions(name="ddim", num_steps=50), schedule_from_config(config.diffusion))

    def run(params, noise, context, null_context, scale):
        apply = lambda x, t, c: unet.apply({"params": params}, x, t, c)
        return sample(sampler, classifier_free_guidance(apply, context, null_context, scale), noise)

    abstract_params = jax.eval_shape(
        lambda: unet.init(
            jax.random.key(0), jnp.zeros((1, latent, latent, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, width))
        )["params"]
    )
    args = (
        abstract_params,
        jax.ShapeDtypeStruct((1, latent, latent, 4), jnp.float32),
        jax.ShapeDtypeStruct((1, 77, width), jnp.float32),
        jax.ShapeDtypeStruct((1, 77, width), jnp.float32),
        jax.ShapeDtypeStruct((), jnp.float32),
    )
    return jax.jit(run), args


def _child(program: str) -> dict:
    import jax

    if _USE_CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _CACHE_DIR.value)
        # Every program is cached, however quickly it compiled (the defaults skip the small ones).
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    t0 = time.perf_counter()
    if program == "train_step":
        fn, args = memory.build_step("fp32", "none", 1, "cache", 1, 77, _LATENT.value)
    else:
        fn, args = _sampler(_LATENT.value)
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return dict(program=program, trace_lower_s=t1 - t0, compile_s=t2 - t1)


def _run_child(program: str, use_cache: bool, cache_dir: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.compile_time", f"--child={program}", f"--latent_size={_LATENT.value}"]
    cmd += [f"--cache_dir={cache_dir}", f"--use_cache={use_cache}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"{program} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
    del argv
    if _CHILD.value:
        print(json.dumps(_child(_CHILD.value)), flush=True)
        return
    unknown = [p for p in _PROGRAMS.value if p not in PROGRAMS]
    if unknown:
        raise app.UsageError(f"--programs={unknown}: must be among {PROGRAMS}")
    cache_dir = _CACHE_DIR.value or tempfile.mkdtemp(prefix="ldm_jax_compile_cache_")
    rows = []
    for program in _PROGRAMS.value:
        for label, use_cache in (("cold", False), ("cold, writing the cache", True), ("from the cache", True)):
            r = _run_child(program, use_cache, cache_dir)
            r["run"] = label
            rows.append(r)
            print(f"{program} ({label}): trace+lower {r['trace_lower_s']:.1f} s, compile {r['compile_s']:.1f} s",
                  flush=True)  # fmt: skip
    size = _LATENT.value
    print(f"\nSD-1.5 UNet programs at {size}x{size}x4 latents ({8 * size} px), XLA:CPU\n")
    print("| program | run | trace + lower s | XLA compile (or cache load) s | total s |")
    print("|---|---|---|---|---|")
    for r in rows:
        total = r["trace_lower_s"] + r["compile_s"]
        print(f"| {r['program']} | {r['run']} | {r['trace_lower_s']:.1f} | {r['compile_s']:.1f} | {total:.1f} |")


if __name__ == "__main__":
    app.run(main)
