"""Per-device memory of an SD-1.5-size UNet training step, from XLA's memory analysis (compile only, no execution).

  python -m benchmarks.memory [--only=fp32-none-fsdp1,bf16-full-fsdp8] [--inputs=cache,pixels] [--per_device_batch=8]

The step is the repository's ``train_step`` (AdamW with clipping, EMA, skip-if-non-finite) with an epsilon-MSE loss
of the UNet (configs/txt2img.py "sd" preset: channels 320/640/1280/1280, context 768) on 64x64x4 latents scaled by
SD's 0.18215 and a 77x768 context. ``--inputs`` picks what the batch holds (each configuration is measured with each):

  cache   a latent cache's batch (``data.source=latents:DIR``): the posterior ``latent_mean`` / ``latent_std``
          [b, 64, 64, 4] and the text encoder's ``context`` [b, 77, 768]; the loss samples the latents with
          ``LatentSpace.latents_from_cache``: no encoder in the step, so the numbers are the UNet's share (default)
  pixels  ``image`` [b, 512, 512, 3] and ``tokens`` [b, 77]: the loss runs the frozen SD VAE encoder (kl_f8,
          posterior sample) and the frozen CLIP ViT-L/14 text encoder, their float32 weights replicated in
          ``frozen`` as the training loop passes them, in the configuration's compute dtype

A name in ``--only`` without inputs (``bf16-none-fsdp1``) is measured with each of ``--inputs``; one with them
(``bf16-none-fsdp1-pixels``) as named. The table's names carry the inputs; for each configuration measured with both
it adds the difference (pixels - cache). It is compiled for 8 host devices (``--xla_force_host_platform_device_count=8``) on a ('data', 'fsdp') mesh
from ``training.sharding.make_mesh``, state shardings from ``tree_shardings``, state donated, across compute dtype
(fp32 / bf16 with float32 parameters), ``unet.remat_policy`` (none / full) and FSDP (1 / 8). Memory comes from
``jax.jit(...).lower(...).compile().memory_analysis()``: arguments (state + batch, per device), temporaries, and the
total = arguments + outputs - aliased (donated) + temporaries. XLA:CPU's account, not a GPU's: fusion and
bf16 handling differ by backend, so read the ratios between configurations more than the absolute numbers.
Prints a markdown table. Run from the repository root (``configs`` is imported from there).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import itertools  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

DTYPES = ("fp32", "bf16")
REMATS = ("none", "full")
FSDPS = (1, 8)
CONFIGS = tuple(f"{d}-{r}-fsdp{f}" for d, r, f in itertools.product(DTYPES, REMATS, FSDPS))
INPUTS = ("cache", "pixels")

_ONLY = flags.DEFINE_list(
    "only", [], f"Configurations to compile, each of {CONFIGS} optionally suffixed -cache / -pixels (default: all)."
)
_INPUTS = flags.DEFINE_list("inputs", ["cache"], f"What the batch holds, among {INPUTS}: latent cache or pixels.")
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 8, "Examples per device.")
_CONTEXT_LENGTH = flags.DEFINE_integer("context_length", 77, "Tokens of the (abstract) text context.")
_LATENT_SIZE = flags.DEFINE_integer("latent_size", 64, "Latent side (64 = 512px images through a KL-f8).")
_LORA_RANK = flags.DEFINE_integer(
    "lora_rank",
    0,
    "> 0: the LoRA step instead (configs/dreambooth.py:sd_lora): adapters of this rank on the UNet's attention are the "
    "train state, the base UNet is frozen in bfloat16 and replicated; 0: full fine-tuning.",
)

GIB = 2**30
# Stable Diffusion's latent scale (1 / std of the KL-f8's latents).
SD_LATENT_SCALE = 0.18215


def build_step(
    dtype_name: str,
    remat: str,
    fsdp: int,
    inputs: str,
    per_device_batch: int,
    context_length: int,
    latent: int,
    lora_rank: int = 0,
):
    """(jitted step, abstract arguments) of one configuration."""
    import jax
    import jax.numpy as jnp

    from configs import txt2img
    from ldm_jax.diffusion import objectives
    from ldm_jax.diffusion.schedules import schedule_from_config
    from ldm_jax.models.autoencoder import AUTOENCODER_VARIANTS
    from ldm_jax.models.first_stage import build_autoencoder
    from ldm_jax.models.text_encoders import TEXT_ENCODER_VARIANTS, CLIPTextTransformer
    from ldm_jax.models.unet import UNetConfig
    from ldm_jax.tasks.latent_space import LatentSpace
    from ldm_jax.training.optim import make_optimizer
    from ldm_jax.training.sharding import batch_sharding, make_mesh, replicated, tree_shardings
    from ldm_jax.training.state import TrainState
    from ldm_jax.training.steps import train_step

    config = txt2img.get_config("sd")
    u = config.unet
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[dtype_name]
    u.remat_policy = remat
    unet = UNetConfig.from_config(u, "unet.").build(
        in_channels=4, out_channels=4, context_dim=config.text_encoder.width, dtype=dtype
    )
    schedule = schedule_from_config(config.diffusion)
    # The frozen encoders of the pixels step: SD's VAE (never differentiated, hence no remat) and CLIP ViT-L/14,
    # float32 weights and the configuration's compute dtype.
    vae = build_autoencoder(AUTOENCODER_VARIANTS["kl_f8"], jnp.dtype(dtype).name, remat_policy="none")
    clip = CLIPTextTransformer(**TEXT_ENCODER_VARIANTS["clip_vit_l14"], dtype=dtype)
    f = vae.downsampling_factor

    def latents_and_context(frozen, batch, k_post):
        """(scaled latents, context) of a batch: sampled from a latent cache's posterior, or encoded."""
        if inputs == "cache":
            return LatentSpace.latents_from_cache(batch, k_post) * SD_LATENT_SCALE, batch["context"]
        z = vae.apply({"params": frozen["first_stage"]}, batch["image"], method="encode").sample(k_post)
        z = jax.lax.stop_gradient(z * SD_LATENT_SCALE)
        return z, clip.apply({"params": frozen["text"]}, batch["tokens"])

    from ldm_jax.models import lora

    lora_cfg = lora.LoraConfig(rank=lora_rank, base_dtype="bfloat16") if lora_rank else None

    def loss_fn(params, frozen, batch, rng):
        # The latent diffusion task's loss (epsilon prediction, uniform timesteps) on the batch's latents and context.
        if lora_cfg is not None:  # as tasks/adapters.py: the adapters merged into the frozen base
            params = {"unet": lora.merge(frozen["lora_base"]["unet"], params["unet"], lora_cfg.scale)}
        k_post, k_t, k_noise, k_dropout = jax.random.split(rng, 4)
        z0, context = latents_and_context(frozen, batch, k_post)
        t = jax.random.randint(k_t, (z0.shape[0],), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, z0.shape, z0.dtype)
        x_t = objectives.add_noise(schedule, z0, noise, t)
        out = unet.apply({"params": params["unet"]}, x_t, t, context, train=True, rngs={"dropout": k_dropout})
        return objectives.diffusion_loss(out, noise), {}

    tx, lr_schedule = make_optimizer(config.optim, config.train.num_steps, config.data.global_batch_size)
    step = functools.partial(
        train_step, loss_fn=loss_fn, tx=tx, lr_schedule=lr_schedule, ema_decay=config.optim.ema_decay
    )
    n = len(jax.devices())
    mesh = make_mesh(-1, fsdp)
    b = per_device_batch * n

    def init_params(rng):
        x = jnp.zeros((1, latent, latent, 4))
        ctx = jnp.zeros((1, context_length, config.text_encoder.width))
        return {"unet": unet.init(rng, x, jnp.zeros((1,), jnp.int32), ctx)["params"]}

    def init_state(rng):
        if lora_cfg is not None:
            return TrainState.create(lora.init_adapters(rng, jax.eval_shape(init_params, rng), lora_cfg), tx)
        return TrainState.create(init_params(rng), tx)

    abstract_state = jax.eval_shape(init_state, jax.random.key(0))
    state_shardings = tree_shardings(abstract_state, mesh)
    repl = replicated(mesh)
    if inputs == "cache":
        frozen = {}
        batch = {
            "latent_mean": jax.ShapeDtypeStruct((b, latent, latent, 4), jnp.float32),
            "latent_std": jax.ShapeDtypeStruct((b, latent, latent, 4), jnp.float32),
            "context": jax.ShapeDtypeStruct((b, context_length, config.text_encoder.width), jnp.float32),
        }
    else:

        def init_frozen(rng):
            k_vae, k_text = jax.random.split(rng)
            x = jnp.zeros((1, 8 * f, 8 * f, 3))
            tokens = jnp.zeros((1, context_length), jnp.int32)
            return {
                "first_stage": vae.init({"params": k_vae}, x, k_vae)["params"],
                "text": clip.init({"params": k_text}, tokens)["params"],
            }

        frozen = jax.eval_shape(init_frozen, jax.random.key(0))
        batch = {
            "image": jax.ShapeDtypeStruct((b, f * latent, f * latent, 3), jnp.float32),
            "tokens": jax.ShapeDtypeStruct((b, context_length), jnp.int32),
        }
    if lora_cfg is not None:
        base = jax.eval_shape(init_params, jax.random.key(0))
        frozen = dict(frozen, lora_base=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), base))
        trainable = sum(x.size for x in jax.tree.leaves(abstract_state.params))
        print(f"LoRA rank {lora_rank}: {trainable:,} trainable parameters (full: "
              f"{sum(x.size for x in jax.tree.leaves(base)):,})", flush=True)  # fmt: skip
    rng = jax.eval_shape(lambda: jax.random.key(0))
    step_fn = jax.jit(
        step,
        in_shardings=(state_shardings, repl, batch_sharding(mesh), repl),
        out_shardings=(state_shardings, repl),
        donate_argnums=(0,),
    )
    return step_fn, (abstract_state, frozen, batch, rng)


def measure(name: str) -> dict:
    dtype_name, remat, fsdp, inputs = name.split("-")
    step_fn, args = build_step(
        dtype_name,
        remat,
        int(fsdp.removeprefix("fsdp")),
        inputs,
        _PER_DEVICE_BATCH.value,
        _CONTEXT_LENGTH.value,
        _LATENT_SIZE.value,
        _LORA_RANK.value,
    )
    t0 = time.perf_counter()
    compiled = step_fn.lower(*args).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    row = dict(
        name=name,
        config=name.removesuffix(f"-{inputs}"),
        inputs=inputs,
        arguments=m.argument_size_in_bytes / GIB,
        temporaries=m.temp_size_in_bytes / GIB,
        total=total / GIB,
        compile_s=seconds,
    )
    print(
        f"{name}: arguments {row['arguments']:.2f} GiB, outputs {m.output_size_in_bytes / GIB:.2f} GiB, aliased "
        f"{m.alias_size_in_bytes / GIB:.2f} GiB, temporaries {row['temporaries']:.2f} GiB, total "
        f"{row['total']:.2f} GiB (compiled in {seconds:.0f} s)",
        flush=True,
    )
    return row


def main(argv):
    del argv
    import jax

    bad_inputs = [i for i in _INPUTS.value if i not in INPUTS]
    if bad_inputs or not _INPUTS.value:
        raise app.UsageError(f"--inputs={_INPUTS.value}: must be among {INPUTS}")
    names = []
    for n in _ONLY.value or list(CONFIGS):
        expanded = [n] if n.rsplit("-", 1)[-1] in INPUTS else [f"{n}-{i}" for i in _INPUTS.value]
        names += [e for e in expanded if e not in names]
    unknown = [n for n in names if n.rsplit("-", 1)[0] not in CONFIGS]
    if unknown:
        raise app.UsageError(f"--only={unknown}: must be among {CONFIGS}, optionally suffixed -cache / -pixels")
    if len(jax.devices()) != 8:
        raise app.UsageError(f"needs 8 devices, got {jax.devices()} (is JAX_PLATFORMS something other than cpu?)")
    rows = [measure(n) for n in names]
    size = _LATENT_SIZE.value
    print(
        f"\nSD-1.5 UNet train step, {_PER_DEVICE_BATCH.value} x {size}x{size}x4 latents ({8 * size}px images) per "
        f"device, 8 devices, per-device XLA memory analysis\n"
    )
    print("| configuration | inputs | arguments GiB | temporaries GiB | total per device GiB | compile s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['inputs']} | {r['arguments']:.2f} | {r['temporaries']:.2f} | {r['total']:.2f} "
            f"| {r['compile_s']:.0f} |"
        )
    by = {(r["config"], r["inputs"]): r for r in rows}
    pairs = [c for c in dict.fromkeys(r["config"] for r in rows) if (c, "cache") in by and (c, "pixels") in by]
    if pairs:
        print("\nThe encoders' cost: pixels - cache, per device\n")
        print("| configuration | temporaries GiB | total per device GiB |")
        print("|---|---|---|")
        for c in pairs:
            p, q = by[(c, "pixels")], by[(c, "cache")]
            print(f"| {c} | {p['temporaries'] - q['temporaries']:+.2f} | {p['total'] - q['total']:+.2f} |")


if __name__ == "__main__":
    app.run(main)
