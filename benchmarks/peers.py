"""ldm_jax against its peers on the same model with the same weights, in one run: UNet forward, AdamW train step,
a 50-step DDIM sampling loop, first-stage decode, and compile times.

  PYTHONPATH=. .venv/bin/python benchmarks/peers.py [--size=small|sd15] [--rounds=3] [--repeats=5]
      [--only=ours,flax,torch]
  (or bash benchmarks/peers.sh, which also makes the peers' environments)

Peers:
  torch   diffusers (PyTorch) in the reference environment (``LDM_JAX_REFERENCE_PYTHON``, default .venv-ref);
  flax    diffusers 0.39's Flax UNet / VAE (the last release with Flax) in its own environment with our jax
          (``FLAX_PEER_PYTHON``, default .venv-flaxpeer; benchmarks/peers.sh makes it).

The torch peer builds the random-weight diffusers models and saves them (safetensors); ldm_jax converts them with
its own converter (``interop.stable_diffusion.load_component_folder``) and diffusers-Flax with its
``convert_pytorch_state_dict_to_flax``. Every implementation first runs the same inputs and must agree with the
PyTorch outputs (the maximum difference is reported; diffusers-Flax's GEGLU uses tanh-approximated GELU, so it
differs more).

Timing: every implementation runs in its own process, kept alive after its parity check and first calls (compile +
run for the JAX ones, reported as ``first_s``; each child's set-up has the CPU to itself). Then ``--rounds`` rounds:
in each, every operation is called ``--repeats`` times (the DDIM loop: half as many, at least once) in each
implementation in turn, the order rotated from round to round, so that the calls compared are seconds apart. A shared
machine's speed drifts by far more than the differences measured (the same 1024x1024 matrix product read 129-279 ms
within 90 s on the 2026-12-06 machine), and one implementation timed minutes after another reads that drift as its
speed. The table's time is the median of all calls; its ratio (peer / ldm_jax, > 1: ldm_jax is faster) is the median
over rounds of each round's ratio of medians, with the rounds' range. XLA's CPU backend and PyTorch both use every
core (``torch.set_num_threads(os.cpu_count())``).

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


def _timer(fn, first: float | None = None) -> dict:
    """An operation to time: ``fn`` (one call, blocking until done) and the time of its first call (compile + run
    for the JAX ones). ``first``: that time when the caller made the call (the parity check, which compiles)."""
    if first is None:
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
    return {"fn": fn, "first_s": round(first, 3)}


def _adamw_timer(loss, params, batch: tuple) -> dict:
    """``loss``'s AdamW step (the same for both JAX implementations). The batch is an argument, never a
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

    return _timer(one)


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
def run_torch(folder: str, size: dict) -> dict:
    import copy

    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.set_num_threads(os.cpu_count())

    def no_grad(fn):  # timed calls run later, outside this function's no_grad blocks
        def call():
            with torch.no_grad():
                return fn()

        return call

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
        res["forward"] = _timer(no_grad(lambda: unet(x, t, ctx).sample))
    if size["train"]:
        trained = copy.deepcopy(unet).train()  # its own copy: the others keep the saved weights between rounds
        opt = torch.optim.AdamW(trained.parameters(), lr=LEARNING_RATE, weight_decay=1e-2)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(trained(x, t, ctx).sample, target)
            loss.backward()
            opt.step()

        res["train_step"] = _timer(step)
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
        res["ddim"] = _timer(ddim)
    if size["vae"]:
        torch.manual_seed(1)
        vae = AutoencoderKL(**size["vae"]).eval()
        vae.save_pretrained(os.path.join(folder, "vae"))
        z = nchw(inp["z"])
        with torch.no_grad():
            outputs["decode"] = vae.decode(z).sample.numpy().transpose(0, 2, 3, 1)
            res["decode"] = _timer(no_grad(lambda: vae.decode(z).sample))
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


def run_flax(folder: str, size: dict) -> dict:
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
    res["forward"] = _timer(lambda: fwd(params, x, t, ctx).block_until_ready(), first)
    if size["train"]:
        res["train_step"] = _adamw_timer(
            lambda p, x, t, ctx, target: jnp.mean((unet.apply({"params": p}, x, t, ctx).sample - target) ** 2),
            params,
            (x, t, ctx, target),
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
        res["ddim"] = _timer(lambda: ddim(params, x, ctx).block_until_ready(), first)
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
        res["decode"] = _timer(lambda: dec(vparams, z).block_until_ready(), first)
    return res


# ---- ldm_jax ---------------------------------------------------------------------------------------------------------
def run_ours(folder: str, size: dict, attention_impl: str = "auto", conv_impl: str = "auto") -> dict:
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
    res["forward"] = _timer(lambda: fwd(params, x, t, ctx).block_until_ready(), first)
    if size["train"]:
        res["train_step"] = _adamw_timer(
            lambda p, x, t, ctx, target: jnp.mean((unet.apply({"params": p}, x, t, ctx, train=True) - target) ** 2),
            params,
            (x, t, ctx, target),
        )
    if size["ddim_steps"]:
        sampler = make_sampler(SamplerOptions(name="ddim", num_steps=size["ddim_steps"]), make_schedule())
        ddim = jax.jit(lambda p, lat, c: sample(sampler, lambda z, tt: unet.apply({"params": p}, z, tt, c), lat))
        t0 = time.perf_counter()
        out = np.asarray(ddim(params, x, ctx))
        first = time.perf_counter() - t0
        res["max_abs_diff"]["ddim"] = float(np.abs(out - ref["ddim"]).max())
        res["ddim"] = _timer(lambda: ddim(params, x, ctx).block_until_ready(), first)
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
        res["decode"] = _timer(lambda: dec(vparams, z).block_until_ready(), first)
    return res


RUNNERS = {"torch": run_torch, "flax": run_flax, "ours": run_ours}
OPS = ("forward", "train_step", "ddim", "decode")
_REPLY = "@@peers "  # prefix of the protocol lines a child writes (libraries may print to stdout too)


def _serve(which: str, folder: str, size: dict, extra: tuple) -> None:
    """A child: builds its implementation, runs the parity checks and first calls, says it is ready (with its
    outputs' differences and first-call times), then times what the parent asks for, one ``<op> <calls>`` line at a
    time, until stdin closes. Waiting, it uses no CPU."""
    res = RUNNERS[which](folder, size, *extra)
    timers = {op: res.pop(op) for op in OPS if op in res}
    res["first_s"] = {op: timer["first_s"] for op, timer in timers.items()}
    print(_REPLY + json.dumps(res), flush=True)
    for line in sys.stdin:
        op, calls = line.split()
        times = []
        for _ in range(int(calls)):
            t0 = time.perf_counter()
            timers[op]["fn"]()
            times.append(time.perf_counter() - t0)
        print(_REPLY + json.dumps(times), flush=True)


class _Child:
    """One implementation in its own process (``_serve``), kept alive so that the implementations' calls can
    alternate within seconds of each other."""

    def __init__(self, name: str, which: str, python: str, folder: str, args, extra: tuple = ()):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("XLA_FLAGS", None)  # one real CPU device, XLA's default optimisation
        cmd = [python, os.path.abspath(__file__), "--_child", which, "--_folder", folder, "--size", args.size]
        cmd += ["--_attention_impl", extra[0], "--_conv_impl", extra[1]] if extra else []
        self.name, self.python = name, python
        self.log = tempfile.TemporaryFile("w+")  # stderr: a file, so a chatty child never blocks on a full pipe
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1
        )
        self.info = self._reply()
        self.info["setup_s"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: ready {json.dumps(self.info)}", file=sys.stderr, flush=True)

    def _reply(self):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.log.seek(0)
                raise SystemExit(f"{self.name} ({self.python}) failed:\n{self.log.read()[-4000:]}")
            if line.startswith(_REPLY):
                return json.loads(line[len(_REPLY) :])

    def time(self, op: str, calls: int) -> list[float]:
        self.proc.stdin.write(f"{op} {calls}\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def _measure(children: dict, rounds: int, repeats: int) -> dict:
    """``rounds`` rounds; in each, every operation is timed in every implementation one after the other (``repeats``
    calls; the DDIM loop half as many, at least 1), the order rotated from round to round. On a shared machine whose
    speed drifts (measured here: the same matrix product from 129 to 279 ms within 90 s), calls made seconds apart
    see the same machine; each ratio is taken within a round, and the rounds' ratios are reported with their range."""
    times = {name: {op: [] for op in OPS if op in c.info["first_s"]} for name, c in children.items()}
    per_round = {name: {op: [] for op in ops} for name, ops in times.items()}
    names = list(children)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for op in OPS:
            for name in order:
                if op in times[name]:
                    got = children[name].time(op, max(1, repeats // 2) if op == "ddim" else repeats)
                    times[name][op] += got
                    per_round[name][op].append(statistics.median(got))
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    results = {}
    for name, c in children.items():
        res = {k: v for k, v in c.info.items() if k != "first_s"}
        for op, ts in times[name].items():
            res[op] = {
                "first_s": c.info["first_s"][op],
                "median_s": round(statistics.median(ts), 4),
                "min_s": round(min(ts), 4),
                "calls": len(ts),
                "round_medians_s": [round(v, 4) for v in per_round[name][op]],
            }
        results[name] = res
    ours = per_round.get("ours", {})
    for name, medians in per_round.items():
        if name == "ours":
            continue
        ratios = {}
        for op, peer in medians.items():
            if op in ours:
                rs = sorted(p / o for p, o in zip(peer, ours[op], strict=True))
                ratios[op] = {
                    "median": round(statistics.median(rs), 3),
                    "min": round(rs[0], 3),
                    "max": round(rs[-1], 3),
                }
        results[name]["ratio_to_ours"] = ratios
    return results


def _table(results: dict) -> str:
    lines = ["| | " + " | ".join(OPS) + " |", "|---|" + "---|" * len(OPS)]
    for res in results.values():
        cells = []
        for op in OPS:
            if op not in res:
                cells.append("")
                continue
            cell = f"{res[op]['median_s'] * 1000:.0f} ms (first {res[op]['first_s']:.1f} s)"
            ratio = res.get("ratio_to_ours", {}).get(op)
            if ratio:  # peer time / ldm_jax time, within each round: median (range over rounds)
                cell += f", **{ratio['median']:.2f}x** ({ratio['min']:.2f}-{ratio['max']:.2f})"
            cells.append(cell)
        lines.append(f"| {res['impl']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(SIZES), default="small")
    parser.add_argument("--repeats", type=int, default=5, help="calls per operation and round (DDIM: half)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of alternating calls (see _measure)")
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
        _serve(args._child, args._folder, size, extra)
        return
    if args.rounds < 1 or args.repeats < 1:
        raise SystemExit(f"--rounds={args.rounds} --repeats={args.repeats}: both must be >= 1")
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    children = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or tmp
        os.makedirs(folder, exist_ok=True)
        try:
            # One after the other: each child's first calls (the compile times reported) have the CPU to themselves.
            if "torch" in only or not os.path.exists(os.path.join(folder, "reference.npz")):
                children["torch"] = _Child("torch", "torch", args.ref_python, folder, args)  # builds, saves models
                if "torch" not in only:
                    children.pop("torch").close()
            if "flax" in only:
                children["flax"] = _Child("flax", "flax", args.flax_python, folder, args)
            if "ours" in only:
                rows = [(a, c) for a in args.ours_attention.split(",") for c in args.ours_conv.split(",")]
                for i, (attn, conv) in enumerate(rows):
                    name = "ours" if i == 0 else f"ours_{attn}_{conv}"
                    children[name] = _Child(name, "ours", sys.executable, folder, args, (attn, conv))
            results = _measure(children, args.rounds, args.repeats)
        finally:
            for c in children.values():
                c.close()
    summary = {"size": args.size, "cpus": os.cpu_count(), "rounds": args.rounds, "results": results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    print(_table(dict(sorted(results.items(), key=lambda kv: (not kv[0].startswith("ours"), kv[0])))))


if __name__ == "__main__":
    main()
