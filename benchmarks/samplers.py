"""Sampler throughput and compile time on a trained txt2img workdir, and scan vs a Python loop over a jitted step.

  python benchmarks/samplers.py --workdir=runs/demo/txt2img [--batch=64] [--repeats=2]

For each (sampler, steps) in --runs: ahead-of-time compile time of the whole generation program (text encoder,
guided sampler loop, decoder), then images/s over --repeats timed calls of --batch images. Then the same DDIM
sampling as (a) one lax.scan program and (b) a Python loop calling one jitted guided step per timestep, same model,
same inputs: their outputs must agree, and the ratio of their times is reported. Prints one JSON object.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo/txt2img", "A trained txt2img workdir.")
_RUNS = flags.DEFINE_list("runs", ["ddim:50", "dpmpp_2m:20", "euler:20", "pndm:20"], "sampler:steps pairs.")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per call.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls per sampler (after compiling).")
_LOOP_STEPS = flags.DEFINE_integer("loop_steps", 50, "DDIM steps for the scan vs Python-loop comparison.")


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    jax_block(out)
    return out, time.perf_counter() - t0


def jax_block(x):
    import jax

    return jax.tree.map(lambda a: a.block_until_ready(), x)


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ldm_jax import jax_setup
    from ldm_jax.diffusion import samplers
    from ldm_jax.diffusion.guidance import classifier_free_guidance
    from ldm_jax.tasks import load_for_sampling
    from ldm_jax.training import transfer
    from ldm_jax.training.sharding import batch_sharding, replicated

    jax_setup.configure()
    task, params, frozen, mesh, step = load_for_sampling(_WORKDIR.value)
    n = _BATCH.value
    prompts = [task.config.sample.prompts[i % len(task.config.sample.prompts)] for i in range(n)]
    rows, repl = batch_sharding(mesh), replicated(mesh)
    tokens, negative, seeds = transfer.to_mesh(
        (task.tokenizer(prompts), task.tokenizer([""] * n), np.arange(n, dtype=np.uint32)), rows
    )
    guidance, rescale = transfer.to_mesh((np.float32(task.config.sample.guidance_scale), np.float32(0.0)), repl)
    args = (params, frozen, tokens, negative, seeds, guidance, rescale, {})
    result = {"workdir": _WORKDIR.value, "checkpoint_step": step, "devices": mesh.size, "batch": n, "samplers": []}
    for spec in _RUNS.value:
        name, steps = spec.split(":")
        options = task.sampler_options(name=name, num_steps=int(steps))
        jitted = task.compiled_generate(mesh, options)
        t0 = time.perf_counter()
        compiled = jitted.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        times = [_timed(compiled, *args)[1] for _ in range(_REPEATS.value)]
        best = min(times)
        result["samplers"].append(
            dict(
                sampler=name,
                steps=int(steps),
                compile_s=round(compile_s, 2),
                call_s=[round(t, 2) for t in times],
                images_per_s=round(n / best, 2),
                model_evals=samplers.make_sampler(options, task.schedule).num_evals,
            )
        )
        print(json.dumps(result["samplers"][-1]), flush=True)

    # Scan vs Python loop, DDIM, latents only (no text encoder or decoder in either).
    options = task.sampler_options(name="ddim", num_steps=_LOOP_STEPS.value)
    sampler = samplers.make_sampler(options, task.schedule)
    text = lambda tok: task.text_encoder.apply({"params": task._text_params(params, frozen)}, tok)  # noqa: E731
    cond, uncond = jax.jit(text)(tokens), jax.jit(text)(negative)
    x_T = jax.random.normal(jax.random.key(0), (n, *task.latent_shape))

    def model_fn_for(p, c, u):
        apply = lambda x, t, ctx: task.unet.apply({"params": p["unet"]}, x, t, ctx)  # noqa: E731
        return classifier_free_guidance(apply, c, u, guidance)

    scan = jax.jit(lambda p, c, u, x: samplers.sample(sampler, model_fn_for(p, c, u), x))

    @jax.jit
    def one_step(p, c, u, state, row):
        x_in = sampler.model_input(state, row)
        t = jnp.broadcast_to(row["t"], (x_in.shape[0],))
        return sampler.step(state, row, model_fn_for(p, c, u)(x_in, t), None)

    rows = [{k: jnp.asarray(v[i]) for k, v in sampler.rows.items()} for i in range(sampler.num_evals)]

    def loop(p, c, u, x):
        state = sampler.start(x)
        for row in rows:
            state = one_step(p, c, u, state, row)
        return state["x"]

    t0 = time.perf_counter()
    scan_compiled = scan.lower(params, cond, uncond, x_T).compile()
    scan_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax_block(one_step(params, cond, uncond, sampler.start(x_T), rows[0]))
    loop_first = time.perf_counter() - t0
    scan_out, scan_s = min(
        (_timed(scan_compiled, params, cond, uncond, x_T) for _ in range(_REPEATS.value)), key=lambda r: r[1]
    )
    loop_out, loop_s = min((_timed(loop, params, cond, uncond, x_T) for _ in range(_REPEATS.value)), key=lambda r: r[1])
    result["scan_vs_loop"] = dict(
        sampler="ddim",
        steps=_LOOP_STEPS.value,
        scan_compile_s=round(scan_compile, 2),
        loop_step_first_call_s=round(loop_first, 2),
        scan_s=round(scan_s, 3),
        loop_s=round(loop_s, 3),
        loop_over_scan=round(loop_s / scan_s, 3),
        max_abs_diff=float(np.abs(np.asarray(scan_out) - np.asarray(loop_out)).max()),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
