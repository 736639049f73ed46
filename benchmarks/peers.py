"""ldm_jax against its peers on the same model with the same weights, in one run: UNet forward, AdamW train step,
a 50-step DDIM sampling loop, first-stage decode, and compile times.

  PYTHONPATH=. .venv/bin/python benchmarks/peers.py [--size=small|sd15] [--repeats=5] [--only=ours,flax,torch]
  (or bash benchmarks/peers.sh, which also makes the peers' environments)

Peers:
  torch   diffusers (PyTorch) in the reference environment (``LDM_JAX_REFERENCE_PYTHON``, default .venv-ref);
  flax    diffusers 0.39's Flax UNet / VAE (the last release with Flax) in its own environment with our jax
          (``FLAX_PEER_PYTHON``, default .venv-flaxpeer; benchmarks/peers.sh makes it).

The torch peer builds the random-weight diffusers models and saves them (safetensors); ldm_jax converts them with
its own converter (``interop.stable_diffusion.load_component_folder``) and diffusers-Flax with its
``convert_pytorch_state_dict_to_flax``. Every implementation first runs the same inputs and must agree with the
PyTorch outputs (the maximum difference is reported; diffusers-Flax's GEGLU uses tanh-approximated GELU, so it
differs more). Each implementation runs in its own process, one after the other, on the same machine; the table
reports each time as a ratio, peer time / ldm_jax time (> 1: ldm_jax is faster).

Timing: the first call of each function (compile + run for the JAX ones) is reported as ``first_s``; then
``--repeats`` calls (the DDIM loop: half as many, at least 2), of which the median is the time. XLA's CPU backend
and PyTorch both use every core (``torch.set_num_threads(os.cpu_count())``).

Sizes:
  small  the issue's model: block_out_channels (64, 128, 256), 2 layers per block, cross-attention on the first two
         levels, 8 heads, context 256; batch 4 of 32x32x4 latents, 77 tokens; VAE (64, 128, 256, 256) decoding
         2 latents of 32x32x4 to 256 px.
  sd15   the SD-1.5 UNet (860M parameters) at 256 px (32x32 latents), batch 2 (one guided image), 77x768 context:
         forward only (an AdamW step would need ~14 GB for the optimizer state alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SIZES = {
    "small": dict(
        unet=dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(64, 128, 256),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=256,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(64, 128, 256, 256),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=256,
        ),
        batch=4,
        latent=32,
        tokens=77,
        context=256,
        decode_batch=2,
        train=True,
        ddim_steps=50,
    ),
    "sd15": dict(
        unet=dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=None,
        batch=2,
        latent=32,
        tokens=77,
        context=768,
        decode_batch=0,
        train=False,
        ddim_steps=0,
    ),
}
LEARNING_RATE = 1e-4
# Stable Diffusion's DDIM settings, the same for both diffusers peers (ldm_jax's SamplerOptions defaults are these).
DDIM_SCHEDULER = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _timed(fn, repeats: int, first: float | None = None) -> dict:
    """``first``: the time of the first call when the caller made it (the parity check, which compiles)."""
    if first is None:
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"first_s": round(first, 3), "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4)}


def _time_adamw(loss, params, batch: tuple, repeats: int) -> dict:
    """Times ``loss``'s AdamW step (the same for both JAX implementations). The batch is an argument, never a
    closed-over constant: XLA:CPU runs a program with a large embedded constant measurably slower (a DDIM loop with
    the context as a constant took 1.3x as long)."""
    import jax
    import jax.numpy as jnp
    import optax

    tx = optax.adamw(LEARNING_RATE, weight_decay=1e-2)

    def step(p, o, batch):
        value, g = jax.value_and_grad(loss)(p, *batch)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, value

    step = jax.jit(step, donate_argnums=(0, 1))
    state = [jax.tree.map(jnp.copy, params), tx.init(params)]

    def one():
        state[0], state[1], value = step(*state, batch)
        value.block_until_ready()

    return _timed(one, repeats)


def _inputs(size: dict):
    import numpy as np

    rng = np.random.default_rng(0)
    b, s = size["batch"], size["latent"]
    return dict(
        x=rng.standard_normal((b, s, s, 4)).astype(np.float32),  # NHWC
        t=np.asarray([999, 500, 250, 1][:b] + [10] * max(0, b - 4), np.int32),
        ctx=rng.standard_normal((b, size["tokens"], size["context"])).astype(np.float32),
        target=rng.standard_normal((b, s, s, 4)).astype(np.float32),
        z=rng.standard_normal((size["decode_batch"], s, s, 4)).astype(np.float32),
    )


# ---- torch (the reference environment): makes the models, then times itself ---------------------------------------
def run_torch(folder: str, size: dict, repeats: int) -> dict:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**size["unet"])
    # Random, not zero-initialised, output layers: every implementation must produce a non-trivial output.
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    unet.save_pretrained(os.path.join(folder, "unet"))
    inp = _inputs(size)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    x, t, ctx, target = (
        nchw(inp["x"]),
        torch.from_numpy(inp["t"]).long(),
        torch.from_numpy(inp["ctx"]),
        nchw(inp["target"]),
    )
    outputs, res = {}, {"impl": f"diffusers {__import__('diffusers').__version__} PyTorch {torch.__version__}"}
    unet.eval()
    with torch.no_grad():
        outputs["unet"] = unet(x, t, ctx).sample.numpy().transpose(0, 2, 3, 1)
        res["forward"] = _timed(lambda: unet(x, t, ctx).sample, repeats)
    if size["train"]:
        unet.train()
        opt = torch.optim.AdamW(unet.parameters(), lr=LEARNING_RATE, weight_decay=1e-2)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(unet(x, t, ctx).sample, target)
            loss.backward()
            opt.step()

        res["train_step"] = _timed(step, repeats)
        unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval()  # untrained again
    if size["ddim_steps"]:
        sched = DDIMScheduler(**DDIM_SCHEDULER)

        def ddim():
            sched.set_timesteps(size["ddim_steps"])
            lat = x.clone()
            with torch.no_grad():
                for tt in sched.timesteps:
                    eps = unet(lat, tt, ctx).sample
                    lat = sched.step(eps, tt, lat).prev_sample
            return lat

        outputs["ddim"] = ddim().numpy().transpose(0, 2, 3, 1)
        res["ddim"] = _timed(ddim, max(2, repeats // 2))
    if size["vae"]:
        torch.manual_seed(1)
        vae = AutoencoderKL(**size["vae"]).eval()
        vae.save_pretrained(os.path.join(folder, "vae"))
        z = nchw(inp["z"])
        with torch.no_grad():
            outputs["decode"] = vae.decode(z).sample.numpy().transpose(0, 2, 3, 1)
            res["decode"] = _timed(lambda: vae.decode(z).sample, repeats)
    np.savez(os.path.join(folder, "reference.npz"), **outputs)
    return res


# ---- diffusers-Flax 0.39 (its own environment, our jax) ------------------------------------------------------------
class _AsTorch:
    """What ``convert_pytorch_state_dict_to_flax`` expects of a tensor: ``.numpy()``."""

    def __init__(self, a):
        self.a = a

    def numpy(self):
        return self.a


def _flax_params(model, folder):
    from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
    from safetensors.numpy import load_file

    sd = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    return convert_pytorch_state_dict_to_flax({k: _AsTorch(v) for k, v in sd.items()}, model)


def run_flax(folder: str, size: dict, repeats: int) -> dict:
    import diffusers
    import jax
    import jax.numpy as jnp
    import numpy as np
    from diffusers import FlaxAutoencoderKL, FlaxDDIMScheduler, FlaxUNet2DConditionModel

    res = {"impl": f"diffusers {diffusers.__version__} Flax, jax {jax.__version__}"}
    cfg = json.load(open(os.path.join(folder, "unet", "config.json")))
    unet = FlaxUNet2DConditionModel.from_config(cfg)
    params = jax.device_put(_flax_params(unet, os.path.join(folder, "unet")))
    inp = _inputs(size)
    ref = np.load(os.path.join(folder, "reference.npz"))
    x = jnp.asarray(inp["x"].transpose(0, 3, 1, 2))
    t, ctx, target = jnp.asarray(inp["t"]), jnp.asarray(inp["ctx"]), jnp.asarray(inp["target"].transpose(0, 3, 1, 2))

    fwd = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c).sample)
    t0 = time.perf_counter()
    out = np.asarray(fwd(params, x, t, ctx)).transpose(0, 2, 3, 1)
    first = time.perf_counter() - t0
    res["max_abs_diff"] = {"unet": float(np.abs(out - ref["unet"]).max())}
    res["forward"] = _timed(lambda: fwd(params, x, t, ctx).block_until_ready(), repeats, first)
    if size["train"]:
        res["train_step"] = _time_adamw(
            lambda p, x, t, ctx, target: jnp.mean((unet.apply({"params": p}, x, t, ctx).sample - target) ** 2),
            params,
            (x, t, ctx, target),
            repeats,
        )
    if size["ddim_steps"]:
        sched = FlaxDDIMScheduler(**DDIM_SCHEDULER)

        # The loop of diffusers' FlaxStableDiffusionPipeline: fori_loop over scheduler.step.
        def ddim(p, lat, ctx):
            state = sched.set_timesteps(sched.create_state(), size["ddim_steps"], lat.shape)

            def body(i, carry):
                lat, state = carry
                tt = jnp.asarray(state.timesteps, jnp.int32)[i]
                eps = unet.apply({"params": p}, lat, jnp.broadcast_to(tt, lat.shape[:1]), ctx).sample
                lat, state = sched.step(state, eps, tt, lat).to_tuple()
                return lat, state

            return jax.lax.fori_loop(0, size["ddim_steps"], body, (lat, state))[0]

        ddim = jax.jit(ddim)
        t0 = time.perf_counter()
        out = np.asarray(ddim(params, x, ctx)).transpose(0, 2, 3, 1)
        first = time.perf_counter() - t0
        res["max_abs_diff"]["ddim"] = float(np.abs(out - ref["ddim"]).max())
        res["ddim"] = _timed(lambda: ddim(params, x, ctx).block_until_ready(), max(2, repeats // 2), first)
    if size["vae"]:
        vcfg = json.load(open(os.path.join(folder, "vae", "config.json")))
        vae = FlaxAutoencoderKL.from_config(vcfg)
        vparams = jax.device_put(_flax_params(vae, os.path.join(folder, "vae")))
        z = jnp.asarray(inp["z"].transpose(0, 3, 1, 2))
        dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode).sample)
        t0 = time.perf_counter()
        out = np.asarray(dec(vparams, z)).transpose(0, 2, 3, 1)
        first = time.perf_counter() - t0
        res["max_abs_diff"]["decode"] = float(np.abs(out - ref["decode"]).max())
        res["decode"] = _timed(lambda: dec(vparams, z).block_until_ready(), repeats, first)
    return res


# ---- ldm_jax ---------------------------------------------------------------------------------------------------------
def run_ours(folder: str, size: dict, repeats: int, attention_impl: str = "auto", conv_impl: str = "auto") -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ldm_jax import jax_setup
    from ldm_jax.diffusion.samplers import SamplerOptions, make_sampler, sample
    from ldm_jax.diffusion.schedules import make_schedule
    from ldm_jax.interop.stable_diffusion import build_first_stage, build_unet, load_component_folder

    jax_setup.configure(attention_impl, conv_impl=conv_impl)
    res = {"impl": f"ldm_jax (attention_impl={attention_impl}, conv_impl={conv_impl}), jax {jax.__version__}"}
    _, fields, params, _ = load_component_folder(os.path.join(folder, "unet"))
    unet = build_unet(fields)
    params = jax.device_put(params)
    inp = _inputs(size)
    ref = np.load(os.path.join(folder, "reference.npz"))
    x, t, ctx, target = (jnp.asarray(inp[k]) for k in ("x", "t", "ctx", "target"))

    fwd = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
    t0 = time.perf_counter()
    out = np.asarray(fwd(params, x, t, ctx))
    first = time.perf_counter() - t0
    res["max_abs_diff"] = {"unet": float(np.abs(out - ref["unet"]).max())}
    res["forward"] = _timed(lambda: fwd(params, x, t, ctx).block_until_ready(), repeats, first)
    if size["train"]:
        res["train_step"] = _time_adamw(
            lambda p, x, t, ctx, target: jnp.mean((unet.apply({"params": p}, x, t, ctx, train=True) - target) ** 2),
            params,
            (x, t, ctx, target),
            repeats,
        )
    if size["ddim_steps"]:
        sampler = make_sampler(SamplerOptions(name="ddim", num_steps=size["ddim_steps"]), make_schedule())
        ddim = jax.jit(lambda p, lat, c: sample(sampler, lambda z, tt: unet.apply({"params": p}, z, tt, c), lat))
        t0 = time.perf_counter()
        out = np.asarray(ddim(params, x, ctx))
        first = time.perf_counter() - t0
        res["max_abs_diff"]["ddim"] = float(np.abs(out - ref["ddim"]).max())
        res["ddim"] = _timed(lambda: ddim(params, x, ctx).block_until_ready(), max(2, repeats // 2), first)
    if size["vae"]:
        _, vfields, vparams, _ = load_component_folder(os.path.join(folder, "vae"))
        vae = build_first_stage(vfields)
        z = jnp.asarray(inp["z"])
        dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))
        vparams = jax.device_put(vparams)
        t0 = time.perf_counter()
        out = np.asarray(dec(vparams, z))
        first = time.perf_counter() - t0
        res["max_abs_diff"]["decode"] = float(np.abs(out - ref["decode"]).max())
        res["decode"] = _timed(lambda: dec(vparams, z).block_until_ready(), repeats, first)
    return res


RUNNERS = {"torch": run_torch, "flax": run_flax, "ours": run_ours}
OPS = ("forward", "train_step", "ddim", "decode")


def _child(which: str, python: str, folder: str, args, attention_impl: str = "auto", conv_impl: str = "auto") -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # one real CPU device, XLA's default optimisation
    cmd = [python, os.path.abspath(__file__), "--_child", which, "--_folder", folder, "--size", args.size]
    cmd += ["--repeats", str(args.repeats), "--_attention_impl", attention_impl, "--_conv_impl", conv_impl]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{which} ({python}) failed:\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_s"] = round(time.perf_counter() - t0, 1)
    print(f"{which}: {json.dumps(res)}", file=sys.stderr, flush=True)
    return res


def _table(results: dict) -> str:
    ours = results.get("ours", {})
    lines = ["| | " + " | ".join(OPS) + " |", "|---|" + "---|" * len(OPS)]
    for which, res in results.items():
        cells = []
        for op in OPS:
            if op not in res:
                cells.append("")
                continue
            ms = res[op]["median_s"] * 1000
            first = res[op]["first_s"]
            cell = f"{ms:.0f} ms (first {first:.1f} s)"
            if which != "ours" and op in ours:  # ratio to the first ldm_jax row
                cell += f", **{res[op]['median_s'] / ours[op]['median_s']:.2f}x**"
            cells.append(cell)
        lines.append(f"| {res['impl']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(SIZES), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="torch,flax,ours", help="implementations to time (torch always builds)")
    parser.add_argument("--ref_python", default=os.environ.get("LDM_JAX_REFERENCE_PYTHON", ".venv-ref/bin/python"))
    parser.add_argument("--flax_python", default=os.environ.get("FLAX_PEER_PYTHON", ".venv-flaxpeer/bin/python"))
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    parser.add_argument(
        "--folder", default="", help="keep the models here; with --only lacking torch, reuse the ones saved there"
    )
    parser.add_argument("--_child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--_folder", default="", help=argparse.SUPPRESS)
    parser.add_argument("--_attention_impl", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--_conv_impl", default="auto", help=argparse.SUPPRESS)
    parser.add_argument(
        "--ours_attention",
        default="auto",
        help="comma-separated ldm_jax attention implementations to time, each its own row (e.g. auto,jax)",
    )
    parser.add_argument(
        "--ours_conv",
        default="auto",
        help="comma-separated ldm_jax 3x3 convolution implementations, each its own row (e.g. auto,xla)",
    )
    args = parser.parse_args()
    size = SIZES[args.size]
    if args._child:
        extra = (args._attention_impl, args._conv_impl) if args._child == "ours" else ()
        print(json.dumps(RUNNERS[args._child](args._folder, size, args.repeats, *extra)))
        return
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or tmp
        os.makedirs(folder, exist_ok=True)
        results = {}
        if "torch" in only or not os.path.exists(os.path.join(folder, "reference.npz")):
            results["torch"] = _child("torch", args.ref_python, folder, args)  # builds and saves the models
        if "flax" in only:
            results["flax"] = _child("flax", args.flax_python, folder, args)
        if "ours" in only:
            rows = [(a, c) for a in args.ours_attention.split(",") for c in args.ours_conv.split(",")]
            for i, (attn, conv) in enumerate(rows):
                name = "ours" if i == 0 else f"ours_{attn}_{conv}"
                results[name] = _child("ours", sys.executable, folder, args, attn, conv)
    summary = {"size": args.size, "cpus": os.cpu_count(), "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    print(_table(dict(sorted(results.items(), key=lambda kv: (not kv[0].startswith("ours"), kv[0])))))


if __name__ == "__main__":
    main()
