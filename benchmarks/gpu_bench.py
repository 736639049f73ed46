"""SD-1.5-size throughput on one GPU: UNet training step (images/s, MFU, XLA memory) and DDIM sampling, ldm_jax
against diffusers (PyTorch). The stages run as separate processes from benchmarks/gpu.sh, each under its own time
limit, and append one JSON object per measurement to WORK/results.jsonl; ``report`` turns those into
gpu_results.json and a markdown table (gpu_results.md), in $OUT too when it is set.

  python benchmarks/gpu_bench.py configs --work=DIR [--tiny]     # the shared diffusers configs (JAX python)
  python benchmarks/gpu_bench.py peer --work=DIR                 # diffusers + PyTorch: matmul peak, sampling
  python benchmarks/gpu_bench.py sample --work=DIR               # ldm_jax sampling (its lax.scan DDIM sampler)
  python benchmarks/gpu_bench.py train --work=DIR                # ldm_jax train step over batch sizes
  python benchmarks/gpu_bench.py report --work=DIR

Models. Training: configs/txt2img.py "sd" preset (the SD-1.5 UNet, 860 M parameters) in compute dtype bfloat16 with
float32 parameters, ``ldm_jax.training.steps.train_step`` (AdamW with clipping, EMA, skip-if-non-finite) on an
epsilon-MSE loss, 64x64x4 latents and a 77x768 context given as inputs (text encoder and VAE left out), as
benchmarks/memory.py builds it. Sampling: text encoder once per batch (cond + empty prompt), 50 DDIM steps with
classifier-free guidance 7.5 (one UNet call on 2B rows per step), VAE decode of the batch, for both frameworks. The
sampling models of both are built from one set of diffusers configs, written by ``configs`` with the repository's
exporters (ldm_jax.interop.diffusers_config) from configs/txt2img.py (UNet, text encoder, DDIM settings) and the
KL-f8 first stage, and read back by ldm_jax through the importers the converter uses. Weights are random (timing
only). ``--tiny`` shrinks everything (a 2-level UNet, 8x8 latents) to check the script on a CPU.

Not imported here: ``ldm_jax.tasks`` (it imports the data pipeline, hence grain and TFDS, which the GPU image lacks),
so the UNet is built from the config's fields and the loss is the latent diffusion task's epsilon loss on given
latents (benchmarks/memory.py's). Top-level imports are the standard library only, so ``peer`` runs in a Python
with PyTorch and diffusers but no JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import json
import math
import os
import statistics
import sys
import time
import traceback

GIB = 2**30
H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA datasheet, SXM, dense (no sparsity)
GUIDANCE = 7.5


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------
class Stage:
    """Result sink and clock of one stage: ``emit`` prints and appends a JSON line at once (a later crash or kill
    keeps what was measured); ``left()`` is the seconds before the stage's deadline."""

    def __init__(self, args):
        self.args = args
        self.deadline = args.deadline if args.deadline > 0 else time.time() + 1e9
        self.path = os.path.join(args.work, "results.jsonl")

    def left(self) -> float:
        return self.deadline - time.time()

    def emit(self, record: dict) -> dict:
        record = {"stage": self.args.stage, **record}
        line = json.dumps(record, default=_json_default)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        return record

    def guarded(self, name: str, fn, *a, **kw):
        """Runs one measurement; an exception is recorded (with its last lines) instead of ending the stage."""
        try:
            return fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - every failure becomes a result line
            tb = traceback.format_exc().strip().splitlines()
            self.emit({"measurement": name, "error": f"{type(e).__name__}: {str(e)[:1500]}", "traceback": tb[-6:]})
            return None


def _json_default(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def _sizes(tiny: bool) -> dict:
    """Latent side, txt2img preset (UNet, text encoder), first-stage variant and the peak-matmul size."""
    if tiny:
        return {"latent": 8, "preset": "tiny", "vae": "tiny_f8", "matmul": 512}
    return {"latent": 64, "preset": "sd", "vae": "kl_f8", "matmul": 8192}


def _out_path(name: str) -> str | None:
    out = os.environ.get("OUT")
    return os.path.join(out, name) if out else None


# ---------------------------------------------------------------------------------------------------------------
# JAX side
# ---------------------------------------------------------------------------------------------------------------
def _jax_setup(args):
    import jax

    from ldm_jax import jax_setup

    jax_setup.configure()
    if args.cache:
        # Compiled programs and (on GPU) per-fusion autotuning results shared by the stages' processes.
        jax.config.update("jax_compilation_cache_dir", args.cache)
    return jax


def _device_info(jax) -> dict:
    d = jax.devices()[0]
    import flax
    import optax

    info = {"platform": d.platform, "device_kind": d.device_kind, "devices": len(jax.devices()), "jax": jax.__version__}
    info.update(flax=flax.__version__, optax=optax.__version__)
    stats = d.memory_stats() or {}
    if "bytes_limit" in stats:
        info["pool_gib"] = round(stats["bytes_limit"] / GIB, 2)
    return info


def _txt2img_config(tiny: bool):
    from configs import txt2img

    config = txt2img.get_config(_sizes(tiny)["preset"])
    config.dtype = "bfloat16"  # compute dtype; parameters stay float32
    return config


def _unet(config, **overrides):
    """``UNet`` from ``config.unet`` (the fields it shares with the module) and the task-side widths."""
    from ldm_jax.models.unet import UNet

    names = {f.name for f in dataclasses.fields(UNet)} & set(config.unet.keys())
    fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.unet.items() if k in names}
    return UNet(**{**fields, **overrides})


def host_random_tree(jax, abstract, seed: int = 0):
    """Host (numpy) values shaped like the abstract tree ``abstract``: float leaves named like weights get random
    normal values scaled 1/sqrt(fan-in) (0.02 for embeddings), ``scale`` leaves ones, everything else zeros (biases,
    optimizer moments, counters). Leaves whose path starts with an ``opt_state`` are zeros whatever their name.

    Timing only: the values need to be finite, of a sane size and not all equal (a matrix product of zeros runs
    faster than one of random data). Each weight is a window of one 2^25-value draw at a random offset, so this
    costs a copy of the weights on the host and no device program (a jitted slicing program over ~700 leaves spent
    about 70 s in XLA:GPU's compiler on the H200).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.standard_normal(1 << 25, dtype=np.float32)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    leaves = []
    for path, x in flat:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        name, shape, dtype = keys[-1], tuple(x.shape), np.dtype(x.dtype)
        n = math.prod(shape)
        weight = name not in ("bias", "scale") and "opt_state" not in keys and np.issubdtype(dtype, np.floating)
        if name == "scale" and "opt_state" not in keys:
            leaves.append(np.ones(shape, dtype))
        elif not weight or n == 0:
            leaves.append(np.zeros(shape, dtype))
        else:
            off = int(rng.integers(len(base)))
            v = base[off : off + n]
            if v.size < n:
                v = np.resize(np.concatenate([v, base[:off]]), n)
            fan_in = math.prod(shape[:-1]) if len(shape) > 1 else 1
            std = 0.02 if name in ("embedding", "position_embedding") else 1.0 / math.sqrt(fan_in)
            leaves.append((v.reshape(shape) * std).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def random_on_device(jax, abstract, shardings=None, seed: int = 0):
    """``host_random_tree`` placed on the device(s) in one transfer."""
    tree = host_random_tree(jax, abstract, seed)
    return jax.block_until_ready(jax.device_put(tree, shardings) if shardings is not None else jax.device_put(tree))


def count_flops(jaxpr) -> float:
    """Multiply-add FLOPs (2 per MAC) of every dot_general and convolution in a (closed) jaxpr, sub-jaxprs included
    (a scan's body counted ``length`` times). Elementwise work is not counted: this is the analytic "model FLOPs"."""
    import numpy as np

    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            k = np.prod([lhs.shape[d] for d in lhs_contract]) if lhs_contract else 1
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, spatial...)
            per_output = rhs.shape[spec[1]] * np.prod([rhs.shape[d] for d in spec[2:]])
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * per_output
        times = eqn.params.get("length", 1) if name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += times * count_flops(inner)
    return float(total)


def _cost_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost["flops"]) if cost and "flops" in cost else None


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {
        "argument_gib": m.argument_size_in_bytes / GIB,
        "output_gib": m.output_size_in_bytes / GIB,
        "alias_gib": m.alias_size_in_bytes / GIB,
        "temp_gib": m.temp_size_in_bytes / GIB,
    }
    out["total_gib"] = out["argument_gib"] + out["output_gib"] - out["alias_gib"] + out["temp_gib"]
    return {k: round(v, 3) for k, v in out.items()}


def _free_bytes(jax) -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def _timed_calls(jax, fn, min_calls: int, min_seconds: float, max_calls: int = 50) -> list[float]:
    """Seconds of each call (blocking), at least ``min_calls`` and until ``min_seconds`` have passed."""
    times = []
    while len(times) < min_calls or (sum(times) < min_seconds and len(times) < max_calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def _write_hlo(compiled, name: str) -> str | None:
    path = _out_path(name)
    if not path:
        return None
    with gzip.open(path, "wt", compresslevel=5) as f:
        f.write(compiled.as_text())
    return os.path.basename(path)


def use_attention(impl: str) -> str:
    """Selects the attention implementation (``ldm_jax.models.attention``: "xla", "cudnn", "auto", "jax") for
    later traces.

    A switch clears JAX's caches: jit reuses the trace of a function it has seen (the same ``train_step`` partial,
    the same closure), which would silently keep the previous attention.
    """
    import jax

    from ldm_jax.models import attention

    # "cudnn" rows use "auto": cuDNN wherever it takes the inputs (half precision, head size, no mask), ldm_jax's
    # xla path elsewhere (e.g. a float32 stage), instead of stopping on the first attention cuDNN refuses.
    setting = "auto" if impl == "cudnn" else impl
    if attention.implementation() != setting:
        jax.clear_caches()
    attention.set_implementation(setting)
    return impl


def _matmul_peak_jax(jax, n: int) -> dict:
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, b))
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        out = mm(a, b)
    jax.block_until_ready(out)
    best = (time.perf_counter() - t0) / reps  # back to back, as the PyTorch peak (one sync at the end)
    return {
        "measurement": "matmul_peak",
        "framework": "jax",
        "n": n,
        "dtype": "bfloat16",
        "tflops": 2 * n**3 / best / 1e12,
    }


# ---- configs ---------------------------------------------------------------------------------------------------
def stage_configs(stage: Stage):
    """Writes WORK/peer_configs.json: UNet, VAE, text encoder and DDIM scheduler configs in diffusers' format, made
    by the repository's exporters from the txt2img config (the ones ``ldm_jax.export`` writes)."""
    from ldm_jax.interop import diffusers_config as dc
    from ldm_jax.models.autoencoder import AUTOENCODER_VARIANTS

    sizes = _sizes(stage.args.tiny)
    config = _txt2img_config(stage.args.tiny)
    te = config.text_encoder
    unet = dc.unet_to_diffusers(dict(config.unet), 4, 4, te.width, sizes["latent"])
    vae = dc.vae_to_diffusers(AUTOENCODER_VARIANTS[sizes["vae"]], 0.18215, sizes["latent"] * 8)
    text = dc.clip_to_transformers(dict(te), pad_id=49407)
    sample = dict(config.sample)
    scheduler = dc.scheduler_to_diffusers(dict(config.diffusion), {**sample, "sampler": "ddim"})
    cfgs = {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler, "latent": sizes["latent"]}
    with open(os.path.join(stage.args.work, "peer_configs.json"), "w") as f:
        json.dump(cfgs, f, indent=1)
    stage.emit(
        {
            "measurement": "configs",
            "unet": {k: unet[k] for k in ("block_out_channels", "attention_head_dim", "cross_attention_dim")},
            "layers_per_block": unet["layers_per_block"],
            "vae": vae["block_out_channels"],
            "text_encoder": [text["hidden_size"], text["num_hidden_layers"]],
            "scheduler": scheduler["_class_name"],
        }
    )


# ---- sampling --------------------------------------------------------------------------------------------------
def _sampling_models(jax, cfgs: dict):
    """(unet, text encoder, vae, scaling factor, sampler options, schedule) from the diffusers configs, through the
    importers ``ldm_jax.convert`` uses."""
    import jax.numpy as jnp
    import ml_collections

    from ldm_jax.diffusion.samplers import SamplerOptions
    from ldm_jax.diffusion.schedules import schedule_from_config
    from ldm_jax.interop import diffusers_config as dc
    from ldm_jax.models.autoencoder import AutoencoderKL
    from ldm_jax.models.text_encoders import CLIPTextTransformer
    from ldm_jax.models.unet import UNet

    bf16 = jnp.bfloat16
    u = dc.unet_from_diffusers(cfgs["unet"])
    u.pop("sample_size")
    unet = UNet(**u, dtype=bf16)
    v = dc.vae_from_diffusers(cfgs["vae"])
    scale = v["scaling_factor"]
    vae = AutoencoderKL(
        **{k: v[k] for k in ("block_out_channels", "layers_per_block", "latent_channels", "norm_groups")},
        mid_attention=v["mid_attention"],
        dtype=bf16,
    )
    text = CLIPTextTransformer(**dc.clip_from_transformers(cfgs["text_encoder"]), dtype=bf16)
    sched = dc.scheduler_from_diffusers(cfgs["scheduler"])
    sample = dict(sched["sample"])
    name = sample.pop("sampler")
    options = SamplerOptions(name=name, prediction_type=sched["diffusion"]["prediction_type"], **sample)
    schedule = schedule_from_config(ml_collections.ConfigDict(sched["diffusion"]))
    return unet, text, vae, scale, options, schedule


def stage_sample(stage: Stage):
    args = stage.args
    jax = _jax_setup(args)
    import jax.numpy as jnp

    from ldm_jax.diffusion import samplers
    from ldm_jax.diffusion.guidance import classifier_free_guidance

    with open(os.path.join(args.work, "peer_configs.json")) as f:
        cfgs = json.load(f)
    info = _device_info(jax)
    stage.emit({"measurement": "device", **info})
    gpu = info["platform"] == "gpu"
    unet, text, vae, scale, options, schedule = _sampling_models(jax, cfgs)
    options = options.replace(num_steps=args.steps)
    sampler = samplers.make_sampler(options, schedule)
    b, s, seq = args.sample_batch, cfgs["latent"], text.max_length
    key = jax.random.key(0)
    abstract = {
        "unet": jax.eval_shape(
            unet.init,
            key,
            jnp.zeros((1, s, s, unet.in_channels)),
            jnp.zeros((1,)),
            jnp.zeros((1, seq, unet.context_dim)),
        )["params"],
        "text": jax.eval_shape(text.init, key, jnp.zeros((1, seq), jnp.int32))["params"],
        "vae": jax.eval_shape(vae.init, key, jnp.zeros((1, 8 * s, 8 * s, 3)), key)["params"],
    }
    t0 = time.perf_counter()
    params = random_on_device(jax, abstract)
    init_s = time.perf_counter() - t0
    tokens = jax.random.randint(jax.random.key(1), (b, seq), 0, text.vocab_size)
    null_tokens = jnp.full((b, seq), 49407, jnp.int32)
    noise = jax.random.normal(jax.random.key(2), (b, s, s, unet.in_channels), jnp.float32)
    guidance = jnp.float32(GUIDANCE)
    common = dict(
        framework="ldm_jax",
        batch=b,
        steps=args.steps,
        guidance=GUIDANCE,
        dtype="bf16 compute, fp32 params",
        latent=s,
        **{k: info[k] for k in ("platform", "device_kind", "jax")},
    )

    def unet_fn(p):
        def apply(x, t, c):
            return unet.apply({"params": p["unet"]}, x, t, c)

        return apply

    def generate(p, tok, null, x_T, g):
        cond = text.apply({"params": p["text"]}, tok)
        uncond = text.apply({"params": p["text"]}, null)
        z0 = samplers.sample(sampler, classifier_free_guidance(unet_fn(p), cond, uncond, g), x_T)
        return jnp.clip(vae.apply({"params": p["vae"]}, z0 / scale, method="decode"), -1.0, 1.0)

    def guided_eval(p, x, t, cond, uncond, g):
        return classifier_free_guidance(unet_fn(p), cond, uncond, g)(x, t)

    def run_generate(impl: str):
        use_attention(impl)
        t0 = time.perf_counter()
        compiled = jax.jit(functools.partial(generate)).lower(params, tokens, null_tokens, noise, guidance).compile()
        compile_s = time.perf_counter() - t0
        call = functools.partial(compiled, params, tokens, null_tokens, noise, guidance)
        first = _timed_calls(jax, call, 1, 0)[0]
        times = _timed_calls(jax, call, args.repeats, 0)
        images = call()
        finite = bool(jnp.isfinite(images).all())
        return stage.emit(
            {
                "measurement": "sample",
                "attention": impl,
                "includes": "text encoder (cond + empty) + DDIM scan (CFG: UNet on 2B rows per step) + VAE decode",
                "compile_s": compile_s,
                "first_call_s": first,
                "call_s": times,
                "images_per_s": b / min(times),
                "finite": finite,
                "param_init_s": init_s,
                **common,
            }
        )

    encode = jax.jit(text.apply)
    cond = encode({"params": params["text"]}, tokens)
    uncond = encode({"params": params["text"]}, null_tokens)
    t_eval = jnp.full((b,), 500.0, jnp.float32)

    def run_eval(impl: str, hlo_name: str | None = None, variant: str = "fp32 params", p=None):
        use_attention(impl)
        p = params if p is None else p
        t0 = time.perf_counter()
        compiled = jax.jit(functools.partial(guided_eval)).lower(p, noise, t_eval, cond, uncond, guidance).compile()
        compile_s = time.perf_counter() - t0
        call = functools.partial(compiled, p, noise, t_eval, cond, uncond, guidance)
        jax.block_until_ready(call())
        times = _timed_calls(jax, call, 10, 1.0)
        fwd = eval_flops
        hlo = stage.guarded("hlo_dump", _write_hlo, compiled, hlo_name) if hlo_name else None
        ms = statistics.median(times) * 1e3
        return stage.emit(
            {
                "measurement": "unet_guided_eval",
                "attention": impl,
                "rows": 2 * b,
                "compile_s": compile_s,
                "ms": ms,
                "model_tflop": fwd / 1e12,
                "xla_tflop": (_cost_flops(compiled) or 0) / 1e12,
                "tflops_per_s": fwd / (ms / 1e3) / 1e12,
                "hlo": hlo,
                **common,
                "dtype": f"bf16 compute, {variant}",
            }
        )

    # Model FLOPs of one guided evaluation, counted with XLA attention (the jaxpr of the cuDNN variant hides the
    # attention products inside its fused call); the same count serves every variant and the PyTorch peer.
    use_attention("xla")
    eval_flops = count_flops(jax.make_jaxpr(guided_eval)(params, noise, t_eval, cond, uncond, guidance))
    stage.guarded("sample", run_generate, "xla")
    stage.guarded("unet_guided_eval", run_eval, "xla", "hlo_unet_eval_xla.txt.gz")
    if gpu and stage.left() > 40:
        stage.guarded("unet_guided_eval", run_eval, "cudnn")
    if stage.left() > 30:
        # The same evaluation with the weights already in bfloat16: what the per-call float32 -> bfloat16 casts of
        # the 860 M float32 parameters cost (flax casts each kernel to the compute dtype inside every call).
        bf16_params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
        stage.guarded("unet_guided_eval", run_eval, "xla", None, "bf16 params", bf16_params)
    if not gpu:
        stage.emit({"measurement": "sample", "attention": "cudnn", "skipped": "not a GPU"})
    elif stage.left() > 75:
        stage.guarded("sample", run_generate, "cudnn")
    else:
        stage.emit({"measurement": "sample", "attention": "cudnn", "skipped": f"time ({stage.left():.0f} s left)"})


# ---- training --------------------------------------------------------------------------------------------------
def stage_train(stage: Stage):
    args = stage.args
    jax = _jax_setup(args)
    import jax.numpy as jnp

    from ldm_jax.diffusion import objectives
    from ldm_jax.diffusion.schedules import schedule_from_config
    from ldm_jax.training.optim import make_optimizer
    from ldm_jax.training.sharding import batch_sharding, make_mesh, replicated, tree_shardings
    from ldm_jax.training.state import TrainState
    from ldm_jax.training.steps import train_step

    info = _device_info(jax)
    stage.emit({"measurement": "device", **info})
    gpu = info["platform"] == "gpu"
    sizes = _sizes(args.tiny)
    stage.guarded("matmul_peak", lambda: stage.emit({**_matmul_peak_jax(jax, sizes["matmul"]), **info}))

    config = _txt2img_config(args.tiny)
    dtype = jnp.dtype(config.dtype)
    width, seq, latent = config.text_encoder.width, config.text_encoder.max_length, sizes["latent"]
    unet = _unet(config, in_channels=4, out_channels=4, context_dim=width, dtype=dtype)
    schedule = schedule_from_config(config.diffusion)
    tx, lr_schedule = make_optimizer(config.optim, config.train.num_steps, config.data.global_batch_size)

    # benchmarks/memory.py's loss: the latent diffusion task's epsilon loss on given latents and context.
    def loss_fn(params, frozen, batch, rng):
        del frozen
        z0, context = batch["latents"], batch["context"]
        k_t, k_noise, k_dropout = jax.random.split(rng, 3)
        t = jax.random.randint(k_t, (z0.shape[0],), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, z0.shape, z0.dtype)
        x_t = objectives.add_noise(schedule, z0, noise, t)
        out = unet.apply({"params": params["unet"]}, x_t, t, context, train=True, rngs={"dropout": k_dropout})
        return objectives.diffusion_loss(out, noise), {}

    step = functools.partial(
        train_step, loss_fn=loss_fn, tx=tx, lr_schedule=lr_schedule, ema_decay=config.optim.ema_decay
    )
    mesh = make_mesh(-1, 1)
    repl, rows = replicated(mesh), batch_sharding(mesh)
    x1 = jnp.zeros((1, latent, latent, 4))
    c1 = jnp.zeros((1, seq, width))
    abstract_params = {"unet": jax.eval_shape(unet.init, jax.random.key(0), x1, jnp.zeros((1,), jnp.int32), c1)}
    abstract_params["unet"] = abstract_params["unet"]["params"]
    abstract_state = jax.eval_shape(lambda p: TrainState.create(p, tx), abstract_params)
    state_shardings = tree_shardings(abstract_state, mesh)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
    fwd_flops_per_example = count_flops(
        jax.make_jaxpr(lambda p, x, t, c: unet.apply({"params": p["unet"]}, x, t, c))(
            abstract_params, x1, jnp.zeros((1,), jnp.int32), c1
        )
    )
    stage.emit(
        {
            "measurement": "train_model",
            "parameters": n_params,
            "forward_tflop_per_example": fwd_flops_per_example / 1e12,
            "remat_policy": config.unet.remat_policy,
            "dtype": config.dtype,
        }
    )

    def new_state():
        t0 = time.perf_counter()
        state = random_on_device(jax, abstract_state, state_shardings)
        return state, time.perf_counter() - t0

    holder = {}
    holder["state"], init_s = new_state()
    rng = jax.random.key(0)
    peak = {"spec": H200_BF16_DENSE_TFLOPS}
    hlo_done = []

    def run(impl: str, b: int) -> bool:
        """One (attention, batch) configuration: compile, memory, then timing if it fits. True if it ran."""
        use_attention(impl)
        step_fn = jax.jit(
            functools.partial(step),  # a new function: a new trace (see use_attention)
            in_shardings=(state_shardings, repl, rows, repl),
            out_shardings=(state_shardings, repl),
            donate_argnums=(0,),
        )
        batch = {
            "latents": jax.random.normal(jax.random.key(3), (b, latent, latent, 4), jnp.float32),
            "context": jax.random.normal(jax.random.key(4), (b, seq, width), jnp.float32),
        }
        batch = jax.device_put(batch, rows)
        t0 = time.perf_counter()
        compiled = step_fn.lower(holder["state"], {}, batch, rng).compile()
        compile_s = time.perf_counter() - t0
        mem = _memory(compiled)
        xla_flops = _cost_flops(compiled)
        model_flops = 3.0 * fwd_flops_per_example * b  # forward + backward (2x): the usual MFU convention
        record = dict(
            measurement="train_step",
            attention=impl,
            batch=b,
            remat=config.unet.remat_policy,
            compile_s=compile_s,
            memory=mem,
            model_tflop_per_step=model_flops / 1e12,
            xla_tflop_per_step=None if xla_flops is None else xla_flops / 1e12,
            **{k: info[k] for k in ("platform", "device_kind")},
        )
        free = _free_bytes(jax)
        need = (mem.get("temp_gib", 0) + mem.get("output_gib", 0) - mem.get("alias_gib", 0)) * GIB
        if free is not None and need > free:
            stage.emit({**record, "fits": False, "why": f"needs {need / GIB:.1f} GiB, {free / GIB:.1f} GiB free"})
            return False
        try:
            warm = []
            for _ in range(2):
                t1 = time.perf_counter()
                holder["state"], metrics = compiled(holder["state"], {}, batch, rng)
                jax.block_until_ready(holder["state"])
                warm.append(time.perf_counter() - t1)
            n = max(5, min(40, int(args.train_seconds / max(warm[-1], 1e-3))))
            t1 = time.perf_counter()
            for _ in range(n):
                holder["state"], metrics = compiled(holder["state"], {}, batch, rng)
            jax.block_until_ready((holder["state"], metrics))
            step_s = (time.perf_counter() - t1) / n
        except Exception as e:  # noqa: BLE001 - an out-of-memory run is a result, not a crash
            if any(leaf.is_deleted() for leaf in jax.tree.leaves(holder["state"])):
                holder["state"], _ = new_state()
            stage.emit({**record, "fits": False, "error": f"{type(e).__name__}: {str(e)[:600]}"})
            return False
        if impl == "xla" and not hlo_done and gpu:
            hlo_done.append(stage.guarded("hlo_dump", _write_hlo, compiled, f"hlo_train_xla_b{b}.txt.gz"))
        tflops = model_flops / step_s / 1e12
        stage.emit(
            {
                **record,
                "fits": True,
                "steps_timed": n,
                "warmup_s": warm,
                "step_ms": step_s * 1e3,
                "images_per_s": b / step_s,
                "model_tflops_per_s": tflops,
                "xla_tflops_per_s": None if xla_flops is None else xla_flops / step_s / 1e12,
                "mfu_spec": tflops / peak["spec"],
                "loss": float(metrics["train/loss"]),
                "state_init_s": init_s,
            }
        )
        return True

    def fits(impl, b):
        ok = stage.guarded("train_step", run, impl, b)
        return bool(ok)

    # Default attention: double the batch while it fits (from --batches[0]); halve below it if that does not fit.
    batches = sorted(args.batches)
    compile_estimate = [60.0]

    def affordable() -> bool:
        return stage.left() > 1.3 * compile_estimate[0] + 20

    best = {}
    for impl in ("xla", "cudnn") if gpu else ("xla",):
        todo = list(batches) if impl == "xla" else [best.get("xla", batches[0])]
        if impl == "cudnn" and "xla" in best:
            todo.append(2 * best["xla"])
        tried_smaller, first = False, True
        while todo and (first or affordable()):
            first = False
            b = todo.pop(0)
            t0 = time.perf_counter()
            ok = fits(impl, b)
            compile_estimate[0] = max(compile_estimate[0] * 0.5, time.perf_counter() - t0)
            if ok:
                best[impl] = max(best.get(impl, 0), b)
                continue
            todo = []
            if impl in best or tried_smaller or b // 2 < 1:
                break
            todo, tried_smaller = [b // 2], True  # the smallest batch did not fit: one try at half of it
        if todo:
            stage.emit({"measurement": "train_step", "attention": impl, "skipped": f"time for batches {todo}"})


# ---------------------------------------------------------------------------------------------------------------
# PyTorch peer (diffusers)
# ---------------------------------------------------------------------------------------------------------------
def stage_peer(stage: Stage):
    args = stage.args
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers import __version__ as diffusers_version
    from transformers import CLIPTextConfig, CLIPTextModel

    with open(os.path.join(args.work, "peer_configs.json")) as f:
        cfgs = json.load(f)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.peer_dtype]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    info = {
        "framework": "diffusers",
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "device_kind": torch.cuda.get_device_name(0) if cuda else "cpu",
    }
    stage.emit({"measurement": "device", **info})

    def matmul_peak():
        n = _sizes(args.tiny)["matmul"]
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        sync()
        reps = 10
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        dt = (time.perf_counter() - t0) / reps
        return stage.emit(
            {
                "measurement": "matmul_peak",
                "framework": "torch",
                "n": n,
                "dtype": "bfloat16",
                "tflops": 2 * n**3 / dt / 1e12,
            }
        )

    stage.guarded("matmul_peak", matmul_peak)

    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        unet = UNet2DConditionModel.from_config(cfgs["unet"]).to(dtype).eval()
        vae = AutoencoderKL.from_config(cfgs["vae"]).to(dtype).eval()
        text = CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"])).to(dtype).eval()
    sched = DDIMScheduler.from_config(cfgs["scheduler"])
    init_s = time.perf_counter() - t0
    processors = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    b, s, seq = args.sample_batch, cfgs["latent"], cfgs["text_encoder"]["max_position_embeddings"]
    g = torch.Generator(device=dev).manual_seed(0)
    tokens = torch.randint(0, cfgs["text_encoder"]["vocab_size"], (b, seq), device=dev, generator=g)
    null_tokens = torch.full((b, seq), 49407, device=dev)
    common = dict(
        batch=b, steps=args.steps, guidance=GUIDANCE, dtype=args.peer_dtype, latent=s, attention=processors, **info
    )

    @torch.inference_mode()
    def generate():
        # StableDiffusionPipeline's loop, without its tokenizer, safety checker and image post-processing.
        cond = text(tokens)[0]
        uncond = text(null_tokens)[0]
        context = torch.cat([uncond, cond])
        sched.set_timesteps(args.steps, device=dev)
        latents = torch.randn((b, 4, s, s), generator=g, device=dev, dtype=dtype) * sched.init_noise_sigma
        for t in sched.timesteps:
            x_in = sched.scale_model_input(torch.cat([latents] * 2), t)
            eps = unet(x_in, t, encoder_hidden_states=context, return_dict=False)[0]
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + GUIDANCE * (eps_cond - eps_uncond)
            latents = sched.step(eps, t, latents, return_dict=False)[0]
        images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0].clamp(-1, 1)
        sync()
        return images

    def run_generate():
        t0 = time.perf_counter()
        generate()
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            images = generate()
            times.append(time.perf_counter() - t0)
        stage.emit(
            {
                "measurement": "sample",
                "includes": "text encoder (cond + empty) + DDIM loop (CFG: UNet on 2B rows per step) + VAE decode",
                "first_call_s": first,
                "call_s": times,
                "images_per_s": b / min(times),
                "finite": bool(torch.isfinite(images).all()),
                "model_init_s": init_s,
                **common,
            }
        )

    @torch.inference_mode()
    def run_eval():
        x = torch.randn((2 * b, 4, s, s), device=dev, dtype=dtype)
        context = torch.randn((2 * b, seq, cfgs["unet"]["cross_attention_dim"]), device=dev, dtype=dtype)
        t = torch.full((2 * b,), 500, device=dev)
        for _ in range(3):
            unet(x, t, encoder_hidden_states=context)
        sync()
        times = []
        while len(times) < 10 or (sum(times) < 1.0 and len(times) < 50):
            t0 = time.perf_counter()
            unet(x, t, encoder_hidden_states=context)
            sync()
            times.append(time.perf_counter() - t0)
        stage.emit({"measurement": "unet_guided_eval", "rows": 2 * b, "ms": statistics.median(times) * 1e3, **common})

    stage.guarded("sample", run_generate)
    stage.guarded("unet_guided_eval", run_eval)


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def _f(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def stage_report(stage: Stage):
    path = os.path.join(stage.args.work, "results.jsonl")
    records = []
    if os.path.exists(path):
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    peaks = {r["framework"]: r["tflops"] for r in records if r.get("measurement") == "matmul_peak" and "tflops" in r}
    measured_peak = peaks.get("torch") or peaks.get("jax")
    for r in records:
        if r.get("measurement") == "train_step" and r.get("model_tflops_per_s") and measured_peak:
            r["mfu_measured_peak"] = r["model_tflops_per_s"] / measured_peak
    devices = sorted({r["device_kind"] for r in records if r.get("measurement") == "device" and "device_kind" in r})
    lines = [
        f"# GPU benchmark ({', '.join(devices) or 'no device recorded'})",
        "",
        (
            f"bf16 8192^3 matmul: {', '.join(f'{k} {v:.0f} TFLOP/s' for k, v in peaks.items()) or 'not measured'}; "
            f"MFU denominators: {H200_BF16_DENSE_TFLOPS:.0f} TFLOP/s (H200 dense bf16 spec) and the measured matmul "
            f"({_f(measured_peak, 0)} TFLOP/s)."
        ),
        "",
        "## Train step (SD-1.5 UNet, 64x64x4 latents, 77x768 context, AdamW + EMA, bf16 compute / fp32 params)",
        "",
        (
            "Model FLOPs = 3 x forward (dots and convolutions counted from the jaxpr, XLA attention), the MFU "
            "numerator. XLA FLOPs = compiled cost_analysis: on GPU it leaves out the cuBLAS / cuDNN custom calls, "
            "so it is far below the model count there. Memory: compiled memory_analysis, GiB."
        ),
        "",
        (
            "| attention | batch | fits | step ms | images/s | model TFLOP/step | XLA TFLOP/step | MFU (spec) | "
            "MFU (measured peak) | args | out | alias | temp | total | compile s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("measurement") != "train_step" or "batch" not in r:
            continue
        m = r.get("memory", {})
        lines.append(
            f"| {r['attention']} | {r['batch']} | {'yes' if r.get('fits') else 'no'} | {_f(r.get('step_ms'))} | "
            f"{_f(r.get('images_per_s'))} | {_f(r.get('model_tflop_per_step'), 2)} | "
            f"{_f(r.get('xla_tflop_per_step'), 2)} | {_f(100 * r['mfu_spec'] if 'mfu_spec' in r else None)}% | "
            f"{_f(100 * r['mfu_measured_peak'] if 'mfu_measured_peak' in r else None)}% | "
            f"{_f(m.get('argument_gib'), 2)} | {_f(m.get('output_gib'), 2)} | {_f(m.get('alias_gib'), 2)} | "
            f"{_f(m.get('temp_gib'), 2)} | {_f(m.get('total_gib'), 2)} | {_f(r.get('compile_s'), 0)} |"
        )
    lines += [
        "",
        "## Sampling (DDIM, CFG 7.5, text encoder + 50 guided UNet evals + VAE decode per batch)",
        "",
        "| framework | attention | batch | steps | images/s | best call s | compile s | first call s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("measurement") == "sample" and "images_per_s" in r:
            att = r["attention"] if isinstance(r["attention"], str) else "/".join(r["attention"])
            lines.append(
                f"| {r['framework']} ({r['dtype']}) | {att} | {r['batch']} | {r['steps']} | "
                f"{_f(r['images_per_s'], 2)} | {_f(min(r['call_s']), 3)} | {_f(r.get('compile_s'), 0)} | "
                f"{_f(r.get('first_call_s'), 2)} |"
            )
    peer = max(
        (
            r["images_per_s"]
            for r in records
            if r.get("measurement") == "sample" and "images_per_s" in r and r.get("framework") == "diffusers"
        ),
        default=None,
    )
    if peer:
        for r in records:
            if r.get("measurement") == "sample" and r.get("framework") == "ldm_jax" and "images_per_s" in r:
                lines.append(
                    f"\nldm_jax ({r['attention']} attention) / diffusers images/s: {r['images_per_s'] / peer:.2f}"
                )
    # One guided evaluation's model FLOPs (the jaxpr count of the same architecture) serves both frameworks.
    eval_tflop = next((r["model_tflop"] for r in records if r.get("model_tflop")), None)
    lines += [
        "",
        "One guided UNet evaluation (CFG: 2B rows), median of >= 10 calls:",
        "",
        "| framework | dtype | attention | UNet rows | ms | model TFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("measurement") == "unet_guided_eval" and "ms" in r:
            att = r["attention"] if isinstance(r["attention"], str) else "/".join(r["attention"])
            tflops = eval_tflop / (r["ms"] / 1e3) if eval_tflop else None
            lines.append(
                f"| {r['framework']} | {r['dtype']} | {att} | {r['rows']} | {_f(r['ms'], 2)} | {_f(tflops, 0)} |"
            )
    problems = [r for r in records if "error" in r or "skipped" in r]
    if problems:
        lines += ["", "## Errors and skips", ""]
        for r in problems:
            what = r.get("error") or f"skipped: {r['skipped']}"
            lines.append(f"- {r.get('stage')} / {r.get('measurement')} {r.get('attention', '')}: {what[:300]}")
    table = "\n".join(lines) + "\n"
    print(table)
    result = {"records": records, "measured_matmul_tflops": peaks, "spec_tflops": H200_BF16_DENSE_TFLOPS}
    for path, text in (
        (os.path.join(stage.args.work, "gpu_results.json"), json.dumps(result, indent=1, default=_json_default)),
        (os.path.join(stage.args.work, "gpu_results.md"), table),
    ):
        with open(path, "w") as f:
            f.write(text)
        out = _out_path(os.path.basename(path))
        if out:
            with open(out, "w") as f:
                f.write(text)


STAGES = {
    "configs": stage_configs,
    "sample": stage_sample,
    "train": stage_train,
    "peer": stage_peer,
    "report": stage_report,
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--work", required=True, help="Folder for results.jsonl and peer_configs.json.")
    p.add_argument("--tiny", action="store_true", help="Tiny models (check the script on a CPU).")
    p.add_argument("--deadline", type=float, default=0.0, help="Epoch seconds; optional measurements stop before.")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64])
    p.add_argument("--train_seconds", type=float, default=3.0, help="Timed train steps last about this long.")
    p.add_argument("--sample_batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2, help="Timed sampling calls after the first.")
    p.add_argument("--peer_dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--cache", default="", help="JAX compilation cache folder shared by the stages.")
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    stage = Stage(args)
    try:
        STAGES[args.stage](stage)
    except Exception as e:  # noqa: BLE001
        stage.emit({"measurement": args.stage, "error": f"{type(e).__name__}: {str(e)[:1500]}"})
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()
