"""Config sections shared by the files in ``configs/``, preset parsing, and ``validate(config)``.

Every field the code reads is declared here or in the config file; ``validate`` runs before any device work and
raises ``ValueError`` naming the field, its value and the rule.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import ml_collections

from ldm_jax.diffusion.objectives import LOSS_WEIGHTINGS, PREDICTION_TYPES
from ldm_jax.diffusion.samplers import SamplerOptions
from ldm_jax.diffusion.schedules import SCHEDULES
from ldm_jax.models.remat import REMAT_POLICIES
from ldm_jax.training.optim import LR_SCALING, LR_SCHEDULES

TASKS = ("autoencoder", "txt2img", "class_cond", "unconditional", "inpainting", "superres")
TEXT_TASKS = ("txt2img", "inpainting")  # conditioned on text: a text encoder, prompts, negative prompts
DTYPES = ("float32", "bfloat16")
DATASETS = ("shapes_captions", "photo_crops")  # TFDS builders in ldm_jax/data/
# Images only: no captions or class attributes, so no text- or class-conditioned task can train on them.
UNLABELLED_DATASETS = ("photo_crops",)
LABELLED_TASKS = TEXT_TASKS + ("class_cond",)
DATASET_CONFIGS = ("tiny", "32px", "64px", "256px")


def parse_preset(arg: str | None, presets: Iterable[str]) -> str:
    presets = tuple(presets)
    name = arg or presets[0]
    if name not in presets:
        raise ValueError(f"config preset {name!r}: must be one of {presets} (as in --config=configs/x.py:{presets[0]})")
    return name


def run_header(task: str, preset: str) -> ml_collections.ConfigDict:
    """The fields every run has, whatever it trains."""
    c = ml_collections.ConfigDict()
    c.task = task
    c.preset = preset
    c.seed = 0
    c.dtype = "float32"
    c.init_from = ""  # a workdir whose latest checkpoint initialises params when this workdir has none
    c.mesh = mesh_section()
    return c


def latent_diffusion_base(task: str, preset: str) -> ml_collections.ConfigDict:
    """``run_header`` plus what every latent diffusion run has: the frozen first stage, the latent scale, the UNet's
    preset-independent fields and the diffusion section (a config adds its data, UNet sizes, sample section...)."""
    c = run_header(task, preset)
    c.first_stage = ml_collections.ConfigDict(dict(workdir="", weights="ema"))
    c.latent_scale = 0.0  # 0: 1/std of the first stage's latents on training images, fixed at the first step
    # remat_policy: rematerialisation of the UNet's blocks (ldm_jax/models/remat.py), trading compute for memory;
    # "full" or "dots" for large models and batches, "none" (fastest) when everything fits.
    c.unet = ml_collections.ConfigDict(dict(use_linear_projection=False, dropout=0.0, remat_policy="none"))
    c.diffusion = diffusion_section()
    return c


def data_section(config_name: str, image_size: int, global_batch_size: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            name="shapes_captions",
            config=config_name,
            data_dir="",  # "" = ~/.cache/ldm_jax/tensorflow_datasets
            image_size=image_size,
            global_batch_size=global_batch_size,
            shuffle_seed=0,
            worker_count=0,  # grain worker processes; 0 reads in the training process
        )
    )


def optim_section(
    lr: float, warmup_steps: int, ema_decay: float, schedule: str = "constant"
) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            lr=lr,
            warmup_steps=warmup_steps,
            schedule=schedule,
            final_lr_fraction=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            grad_clip=1.0,
            ema_decay=ema_decay,
            # Peak lr = lr x (data.global_batch_size / base_batch_size) ** {none: 0, linear: 1, sqrt: 0.5}.
            lr_scaling="none",
            base_batch_size=256,
        )
    )


def train_section(
    num_steps: int, log_every: int, checkpoint_every: int, preview_every: int
) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            num_steps=num_steps,
            log_every=log_every,
            checkpoint_every=checkpoint_every,
            keep_checkpoints=3,
            async_checkpointing=True,
            preview_every=preview_every,  # 0 disables preview grids during training
            # Gradient accumulation: the global batch is split into this many micro-batches inside the step.
            grad_accum_steps=1,
            # Steps in a row with a non-finite loss or gradient (each skipped, params unchanged) that stop the run.
            max_nonfinite_streak=5,
            compilation_cache_dir="",  # persistent XLA compilation cache shared by runs ("" = off)
            # Log a digest of every local batch to <workdir>/data_order/process_<i>.jsonl (audits resume / data).
            record_data_order=False,
        )
    )


def diffusion_section(**overrides) -> ml_collections.ConfigDict:
    """Training schedule and objective (Stable Diffusion's by default)."""
    d = dict(
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=False,  # zero terminal SNR (Lin et al. 2024); pair with v_prediction
        prediction_type="epsilon",
        loss_weighting="simple",  # or "min_snr" (Hang et al. 2023)
        min_snr_gamma=5.0,
        offset_noise=0.0,  # std of a per-channel constant added to the training noise; 0 disables
        cond_drop_prob=0.1,  # conditions replaced by the null condition this often, for classifier-free guidance
    )
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def sample_section(prompts, **overrides) -> ml_collections.ConfigDict:
    """Sampling settings: the sampler and every option of it (see ldm_jax.diffusion.samplers.SamplerOptions)."""
    d = SamplerOptions().to_config()  # sampler, num_steps, spacing, steps_offset, eta, karras_sigmas, ...
    d.update(
        prompts=tuple(prompts),  # preview grids during training
        guidance_scale=3.0,
        guidance_rescale=0.0,  # 0.7 with zero-terminal-SNR models (Lin et al. 2024)
        negative_prompt="",  # the unconditional side of guidance; "" is the null condition used in training
    )
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def small_diffusion_preset(c, preset: str, attention_levels=(True, True)) -> None:
    """Fills the CPU presets every latent diffusion config shares: "demo" (32px images, f=4 latents, a small UNet,
    1500 steps: CPU minutes, first stage from the demo autoencoder run) and "tiny" (16px, for tests)."""
    if preset == "demo":
        c.first_stage.workdir = "runs/demo/autoencoder_kl"
        c.data = data_section("32px", 32, 64)
        c.unet.update(
            dict(
                block_out_channels=(32, 64),
                layers_per_block=1,
                attention_levels=tuple(attention_levels),
                num_heads=(4, 4),
                head_dim=0,
                transformer_depth=1,
                norm_groups=8,
            )
        )
        c.optim = optim_section(lr=1e-3, warmup_steps=100, ema_decay=0.995, schedule="cosine")
        c.optim.final_lr_fraction = 0.1
        c.train = train_section(num_steps=1500, log_every=100, checkpoint_every=500, preview_every=500)
        c.sample.num_steps = 25
    elif preset == "tiny":
        from ldm_jax.models.unet import UNET_VARIANTS

        c.first_stage.workdir = ""  # tests fill this in
        c.data = data_section("tiny", 16, 8)
        c.unet.update(UNET_VARIANTS["tiny"])
        c.unet.block_out_channels = (16, 32)
        c.unet.num_heads = (2, 2)
        c.unet.norm_groups = 8
        c.optim = optim_section(lr=1e-3, warmup_steps=2, ema_decay=0.9)
        c.train = train_section(num_steps=8, log_every=2, checkpoint_every=4, preview_every=0)
        c.sample.num_steps = 4
    else:
        raise ValueError(f"preset={preset!r}: small presets are 'demo' and 'tiny'")


def first_stage_base(kind: str, preset: str, model: dict, disc_start: int, disc_weight: float):
    """``run_header`` plus a first stage's model, loss and discriminator sections (configs/autoencoder_*.py)."""
    c = run_header("autoencoder", preset)
    c.model = ml_collections.ConfigDict(dict(model))
    c.loss = first_stage_loss_section(kind)
    c.disc = disc_section(disc_start, disc_weight)
    return c


def first_stage_schedule(c, size: str) -> None:
    """Data, optimizer and training length of a first-stage run at one of the sizes its presets share:

    "zoo"     the paper's recipe at 256px (Adam 0.5/0.9, lr 4.5e-6 x batch, no clipping or decay), real photos
    "demo"    32px captioned shapes, the txt2img demo's first stage (CPU minutes)
    "photos"  32px real-photo crops for CPU-budget comparisons (held-out photos for evaluation)
    "tiny"    16px shapes, for tests
    """
    if size == "zoo":
        c.data = data_section("256px", 256, 64)
        c.data.name = "photo_crops"
        c.optim = optim_section(lr=4.5e-6, warmup_steps=0, ema_decay=0.9999)
        # The reference's rule: base_lr x (batch per GPU x GPUs): 4.5e-6 x 64 = 2.88e-4 at this batch.
        c.optim.update(lr_scaling="linear", base_batch_size=1)
        c.train = train_section(num_steps=200_000, log_every=100, checkpoint_every=5000, preview_every=5000)
    elif size in ("demo", "photos"):
        c.data = data_section("32px", 32, 16)
        if size == "photos":
            c.data.name = "photo_crops"
        c.optim = optim_section(lr=1e-3, warmup_steps=100, ema_decay=0.99, schedule="cosine")
        c.optim.final_lr_fraction = 0.05
        c.train = train_section(num_steps=1500, log_every=100, checkpoint_every=500, preview_every=500)
        # 32px images: two stride-2 layers give a 6x6 map of 34-pixel patches; the GAN joins halfway.
        c.disc.update(n_layers=2, base_channels=32, start=750)
        # No LPIPS offline (no VGG16 ImageNet weights ship here): the term is off, by this explicit 0.
        c.loss.perceptual_weight = 0.0
    elif size == "tiny":
        c.data = data_section("tiny", 16, 8)
        c.model.block_out_channels = (8, 16, 16)
        c.model.norm_groups = 4
        c.optim = optim_section(lr=1e-3, warmup_steps=2, ema_decay=0.9)
        c.train = train_section(num_steps=8, log_every=2, checkpoint_every=4, preview_every=0)
        c.disc.update(n_layers=2, base_channels=8, start=4)
        c.loss.perceptual_weight = 0.0
    else:
        raise ValueError(f"size={size!r}: first-stage sizes are 'zoo', 'demo', 'photos', 'tiny'")
    # Adam with the reference's betas, no weight decay (it would shrink an EMA codebook) and no clipping: the
    # summed reconstruction term makes gradient norms scale with the image size.
    c.optim.update(b1=0.5, b2=0.9, weight_decay=0.0, grad_clip=0.0)


def first_stage_loss_section(kind: str, **overrides) -> ml_collections.ConfigDict:
    """The first-stage loss (LDM's LPIPSWithDiscriminator / VQLPIPSWithDiscriminator) for a "kl" or "vq" model."""
    d = dict(
        l1_weight=1.0,  # per-pixel |x - x'|, the reference's pixel loss
        l2_weight=0.0,  # per-pixel (x - x')^2, not in the reference; brings flat colours back faster in short runs
        perceptual_weight=1.0,  # LPIPS; 0 turns the term off (explicitly: a positive weight needs weights below)
        lpips_vgg_weights="",  # VGG16 trunk, torchvision layout (.safetensors / .npz, or .pth where torch exists)
        lpips_heads="",  # LPIPS linear heads; "" = the published v0.1 heads shipped with ldm_jax
    )
    if kind == "kl":
        d.update(
            kl_weight=1e-6,  # relative to the per-image sum of the reconstruction term, as in the reference
            logvar_init=0.0,
            learn_logvar=True,  # the reference declares it learned but leaves it out of its optimizer
        )
    else:
        d.update(
            codebook_weight=1.0,
            commitment_beta=0.25,  # beta * ||z - sg(e)||^2 pulls the encoder to its codes
            codebook_update="loss",  # "loss": codes move by the codebook loss; "ema": running means of assignments
            codebook_ema_decay=0.99,
        )
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def disc_section(start: int, weight: float, **overrides) -> ml_collections.ConfigDict:
    """The patch discriminator of the first stage (``ldm_jax.training.gan``)."""
    d = dict(
        enabled=True,  # False: no discriminator at all (no parameters, no adversarial term)
        start=start,  # step from which the adversarial terms count (disc_factor is 0 before)
        weight=weight,  # multiplies the adaptive weight
        factor=1.0,  # disc_factor: scales both players' adversarial losses once started
        loss="hinge",  # or "vanilla" (softplus)
        n_layers=3,
        base_channels=64,
        norm="batch",  # "batch" (batch statistics of each call, as the reference trains) or "none"
    )
    d.update(overrides)
    return ml_collections.ConfigDict(d)


def mesh_section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1))


def _fail(field: str, value, rule: str):
    raise ValueError(f"{field}={value!r}: {rule}")


def _check(cond: bool, field: str, value, rule: str) -> None:
    if not cond:
        _fail(field, value, rule)


def _validate_common(c) -> None:
    _check(c.task in TASKS, "task", c.task, f"must be one of {TASKS}")
    _check(c.dtype in DTYPES, "dtype", c.dtype, f"must be one of {DTYPES}")
    d = c.data
    _check(d.name in DATASETS, "data.name", d.name, f"must be one of {DATASETS}")
    _check(
        not (d.name in UNLABELLED_DATASETS and c.task in LABELLED_TASKS),
        "data.name",
        d.name,
        f"has images only (no captions or class labels); task={c.task!r} needs a labelled dataset: 'shapes_captions'",
    )
    _check(d.config in DATASET_CONFIGS, "data.config", d.config, f"must be one of {DATASET_CONFIGS}")
    _check(d.global_batch_size >= 1, "data.global_batch_size", d.global_batch_size, "must be >= 1")
    _check(d.worker_count >= 0, "data.worker_count", d.worker_count, "must be >= 0")
    o = c.optim
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    _check(o.schedule in LR_SCHEDULES, "optim.schedule", o.schedule, f"must be one of {LR_SCHEDULES}")
    _check(0.0 <= o.ema_decay < 1.0, "optim.ema_decay", o.ema_decay, "must be in [0, 1)")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
    _check(o.lr_scaling in LR_SCALING, "optim.lr_scaling", o.lr_scaling, f"must be one of {tuple(LR_SCALING)}")
    _check(o.base_batch_size >= 1, "optim.base_batch_size", o.base_batch_size, "must be >= 1")
    _check(0.0 <= o.final_lr_fraction <= 1.0, "optim.final_lr_fraction", o.final_lr_fraction, "must be in [0, 1]")
    t = c.train
    _check(t.num_steps >= 1, "train.num_steps", t.num_steps, "must be >= 1")
    for name in ("log_every", "checkpoint_every"):
        _check(t[name] >= 1, f"train.{name}", t[name], "must be >= 1")
    _check(t.preview_every >= 0, "train.preview_every", t.preview_every, "must be >= 0")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", t.grad_accum_steps, "must be >= 1")
    _check(
        d.global_batch_size % t.grad_accum_steps == 0,
        "train.grad_accum_steps",
        t.grad_accum_steps,
        f"must divide data.global_batch_size={d.global_batch_size}",
    )
    _check(
        t.grad_accum_steps == 1 or c.task != "autoencoder",
        "train.grad_accum_steps",
        t.grad_accum_steps,
        "must be 1 for the first stage (its adversarial step weighs the GAN term by full-batch gradient norms)",
    )
    _check(t.max_nonfinite_streak >= 1, "train.max_nonfinite_streak", t.max_nonfinite_streak, "must be >= 1")
    for name in ("data", "fsdp"):
        v = c.mesh[name]
        _check(v == -1 or v >= 1, f"mesh.{name}", v, "must be -1 (fill) or >= 1")


def _validate_channels(prefix: str, chans, groups: int) -> None:
    _check(len(chans) >= 1, f"{prefix}.block_out_channels", chans, "must name at least one level")
    for ch in chans:
        _check(
            ch % groups == 0,
            f"{prefix}.block_out_channels",
            chans,
            f"every entry must be divisible by norm_groups={groups}",
        )


def validate_autoencoder_model(m, image_size: int, prefix: str = "model") -> None:
    _validate_channels(prefix, m.block_out_channels, m.norm_groups)
    f = 2 ** (len(m.block_out_channels) - 1)
    _check(image_size % f == 0, "data.image_size", image_size, f"must be divisible by the autoencoder's factor f={f}")
    _check(m.latent_channels >= 1, f"{prefix}.latent_channels", m.latent_channels, "must be >= 1")
    _check(m.layers_per_block >= 1, f"{prefix}.layers_per_block", m.layers_per_block, "must be >= 1")
    _check(
        m.remat_policy in REMAT_POLICIES, f"{prefix}.remat_policy", m.remat_policy, f"must be one of {REMAT_POLICIES}"
    )


def validate(c) -> None:
    """Checks a config before any device work; raises ValueError naming the first bad field."""
    _validate_common(c)
    if c.task == "autoencoder":
        _validate_first_stage_training(c)
        return
    _check(
        bool(c.first_stage.workdir),
        "first_stage.workdir",
        c.first_stage.workdir,
        "must name a trained autoencoder workdir",
    )
    _check(
        c.first_stage.weights in ("ema", "params"),
        "first_stage.weights",
        c.first_stage.weights,
        "must be 'ema' or 'params'",
    )
    _check(c.latent_scale >= 0, "latent_scale", c.latent_scale, "must be >= 0 (0 = 1/std of training latents)")
    u = c.unet
    _validate_channels("unet", u.block_out_channels, u.norm_groups)
    n = len(u.block_out_channels)
    _check(
        len(u.attention_levels) == n,
        "unet.attention_levels",
        u.attention_levels,
        f"must have {n} entries, one per level",
    )
    _check(len(u.num_heads) == n, "unet.num_heads", u.num_heads, f"must have {n} entries, one per level")
    for lev, ch in enumerate(u.block_out_channels):
        if u.head_dim > 0:
            _check(
                ch % u.head_dim == 0,
                "unet.head_dim",
                u.head_dim,
                f"must divide every level's channels {tuple(u.block_out_channels)}",
            )
        else:
            _check(
                u.num_heads[lev] >= 1 and ch % u.num_heads[lev] == 0,
                "unet.num_heads",
                tuple(u.num_heads),
                f"entry {lev} must be >= 1 and divide {ch} channels",
            )
    _check(0.0 <= u.dropout < 1.0, "unet.dropout", u.dropout, "must be in [0, 1)")
    _check(u.remat_policy in REMAT_POLICIES, "unet.remat_policy", u.remat_policy, f"must be one of {REMAT_POLICIES}")
    if c.task in TEXT_TASKS:
        _validate_text_encoder(c.text_encoder)
        if c.task == "inpainting":
            _validate_inpainting(c.inpainting)
    elif c.task == "superres":
        _validate_superres(c)
    elif c.task == "class_cond":
        from ldm_jax.data.shapes import LABELINGS, num_classes

        _check(c.classes in LABELINGS, "classes", c.classes, f"must be one of {tuple(LABELINGS)}")
        n = num_classes(c.classes)
        labels = tuple(c.sample.class_labels)
        _check(len(labels) >= 1, "sample.class_labels", labels, "must hold at least one class for preview grids")
        _check(all(0 <= x < n for x in labels), "sample.class_labels", labels, f"must be in [0, {n})")
    else:
        _check(c.sample.num_preview >= 1, "sample.num_preview", c.sample.num_preview, "must be >= 1")
    validate_diffusion(c)


def _validate_first_stage_training(c) -> None:
    from ldm_jax.models.discriminator import NORMS, min_image_size
    from ldm_jax.tasks.autoencoder import CODEBOOK_UPDATES
    from ldm_jax.training.gan import DISC_LOSSES

    m, loss, d = c.model, c.loss, c.disc
    _check(m.kind in ("kl", "vq"), "model.kind", m.kind, "must be 'kl' or 'vq'")
    validate_autoencoder_model(m, c.data.image_size)
    for name in ("l1_weight", "l2_weight", "perceptual_weight"):
        _check(loss[name] >= 0, f"loss.{name}", loss[name], "must be >= 0")
    _check(
        loss.l1_weight + loss.l2_weight + loss.perceptual_weight > 0,
        "loss.l1_weight",
        loss.l1_weight,
        "l1_weight + l2_weight + perceptual_weight must be > 0",
    )
    if loss.perceptual_weight > 0:
        _check(
            bool(loss.lpips_vgg_weights),
            "loss.lpips_vgg_weights",
            loss.lpips_vgg_weights,
            f"loss.perceptual_weight={loss.perceptual_weight} needs VGG16 weights (torchvision layout; convert "
            "vgg16-397923af.pth to .safetensors) or set loss.perceptual_weight=0 to train without the LPIPS term",
        )
        _check(
            os.path.isfile(loss.lpips_vgg_weights),
            "loss.lpips_vgg_weights",
            loss.lpips_vgg_weights,
            "no such file",
        )
    if m.kind == "kl":
        _check(loss.kl_weight >= 0, "loss.kl_weight", loss.kl_weight, "must be >= 0")
    else:
        _check(m.num_codes >= 2, "model.num_codes", m.num_codes, "must be >= 2")
        _check(m.embed_dim >= 1, "model.embed_dim", m.embed_dim, "must be >= 1")
        _check(loss.codebook_weight >= 0, "loss.codebook_weight", loss.codebook_weight, "must be >= 0")
        _check(loss.commitment_beta >= 0, "loss.commitment_beta", loss.commitment_beta, "must be >= 0")
        _check(
            loss.codebook_update in CODEBOOK_UPDATES,
            "loss.codebook_update",
            loss.codebook_update,
            f"must be one of {CODEBOOK_UPDATES}",
        )
        _check(
            0.0 < loss.codebook_ema_decay < 1.0,
            "loss.codebook_ema_decay",
            loss.codebook_ema_decay,
            "must be in (0, 1)",
        )
    if d.enabled:
        _check(d.loss in DISC_LOSSES, "disc.loss", d.loss, f"must be one of {DISC_LOSSES}")
        _check(d.norm in NORMS, "disc.norm", d.norm, f"must be one of {NORMS}")
        _check(d.start >= 0, "disc.start", d.start, "must be >= 0")
        _check(d.weight >= 0, "disc.weight", d.weight, "must be >= 0")
        _check(d.factor >= 0, "disc.factor", d.factor, "must be >= 0")
        _check(d.base_channels >= 1, "disc.base_channels", d.base_channels, "must be >= 1")
        _check(d.n_layers >= 1, "disc.n_layers", d.n_layers, "must be >= 1")
        need = min_image_size(d.n_layers)
        _check(
            c.data.image_size >= need,
            "disc.n_layers",
            d.n_layers,
            f"gives no logits on {c.data.image_size}px images (needs a side >= 3 * 2**n_layers = {need})",
        )


def _validate_inpainting(p) -> None:
    _check(p.max_boxes >= 1, "inpainting.max_boxes", p.max_boxes, "must be >= 1")
    _check(
        0.0 < p.min_box_fraction <= p.max_box_fraction <= 1.0,
        "inpainting.min_box_fraction",
        (p.min_box_fraction, p.max_box_fraction),
        "need 0 < min_box_fraction <= max_box_fraction <= 1",
    )
    _check(0.0 <= p.full_mask_prob <= 1.0, "inpainting.full_mask_prob", p.full_mask_prob, "must be in [0, 1]")


def _validate_superres(c) -> None:
    from ldm_jax.tasks.superres import DOWNSAMPLE_METHODS

    sr = c.superres
    _check(sr.scale >= 2, "superres.scale", sr.scale, "must be >= 2 (output side / low-resolution side)")
    _check(
        c.data.image_size % sr.scale == 0,
        "superres.scale",
        sr.scale,
        f"must divide data.image_size={c.data.image_size}",
    )
    _check(
        sr.downsample in DOWNSAMPLE_METHODS,
        "superres.downsample",
        sr.downsample,
        f"must be one of {DOWNSAMPLE_METHODS}",
    )
    _check(sr.noise_schedule in SCHEDULES, "superres.noise_schedule", sr.noise_schedule, f"must be one of {SCHEDULES}")
    _check(
        0 <= sr.max_noise_level < sr.noise_timesteps,
        "superres.max_noise_level",
        sr.max_noise_level,
        f"must be in [0, superres.noise_timesteps={sr.noise_timesteps})",
    )
    _check(
        0 <= c.sample.noise_level <= sr.max_noise_level,
        "sample.noise_level",
        c.sample.noise_level,
        f"must be in [0, superres.max_noise_level={sr.max_noise_level}]",
    )
    _check(c.sample.num_preview >= 1, "sample.num_preview", c.sample.num_preview, "must be >= 1")
    _check(
        c.diffusion.cond_drop_prob == 0.0,
        "diffusion.cond_drop_prob",
        c.diffusion.cond_drop_prob,
        "must be 0 for superres (the low-resolution image always conditions; sampling is not guided)",
    )


def _validate_text_encoder(te) -> None:
    _check(te.max_length >= 2, "text_encoder.max_length", te.max_length, "must be >= 2")
    _check(te.width % te.heads == 0, "text_encoder.heads", te.heads, f"must divide text_encoder.width={te.width}")
    _check(
        te.output_layer in (-1, -2),
        "text_encoder.output_layer",
        te.output_layer,
        "must be -1 (last) or -2 (penultimate)",
    )
    _check(te.pad_token in ("eot", "zero"), "text_encoder.pad_token", te.pad_token, "must be 'eot' or 'zero'")
    _check(
        te.activation in ("quick_gelu", "gelu"),
        "text_encoder.activation",
        te.activation,
        "must be 'quick_gelu' or 'gelu'",
    )


def validate_diffusion(c) -> None:
    """The ``diffusion`` and ``sample`` sections of any diffusion task."""
    df = c.diffusion
    _check(df.beta_schedule in SCHEDULES, "diffusion.beta_schedule", df.beta_schedule, f"must be one of {SCHEDULES}")
    _check(
        df.prediction_type in PREDICTION_TYPES,
        "diffusion.prediction_type",
        df.prediction_type,
        f"must be one of {PREDICTION_TYPES}",
    )
    _check(df.num_train_timesteps >= 2, "diffusion.num_train_timesteps", df.num_train_timesteps, "must be >= 2")
    _check(0.0 <= df.cond_drop_prob < 1.0, "diffusion.cond_drop_prob", df.cond_drop_prob, "must be in [0, 1)")
    _check(
        df.loss_weighting in LOSS_WEIGHTINGS,
        "diffusion.loss_weighting",
        df.loss_weighting,
        f"must be one of {LOSS_WEIGHTINGS}",
    )
    _check(df.min_snr_gamma > 0, "diffusion.min_snr_gamma", df.min_snr_gamma, "must be > 0")
    _check(df.offset_noise >= 0, "diffusion.offset_noise", df.offset_noise, "must be >= 0")
    _check(
        not (df.rescale_betas_zero_snr and df.prediction_type == "epsilon"),
        "diffusion.rescale_betas_zero_snr",
        df.rescale_betas_zero_snr,
        "needs prediction_type 'v_prediction' or 'sample': at zero SNR an epsilon model cannot recover x0",
    )
    s = c.sample
    SamplerOptions.for_run(c)
    _check(s.guidance_scale >= 0, "sample.guidance_scale", s.guidance_scale, "must be >= 0")
    _check(0.0 <= s.guidance_rescale <= 1.0, "sample.guidance_rescale", s.guidance_rescale, "must be in [0, 1]")
    if c.task in TEXT_TASKS:
        _check(len(s.prompts) >= 1, "sample.prompts", s.prompts, "must hold at least one prompt for preview grids")


def save_config(config, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)


def load_config(path: str) -> ml_collections.ConfigDict:
    """Reads a config written by ``save_config`` (e.g. ``<workdir>/config.json``)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no config.json; is this a workdir written by ldm_jax.train?")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    return _fill_new_fields(config)


def _fill_new_fields(config) -> ml_collections.ConfigDict:
    """Adds fields introduced after a workdir was written, with the defaults that reproduce its old behaviour."""
    for name in ("unet", "model"):  # the UNet of diffusion runs, the model of autoencoder runs
        if name in config and "remat_policy" not in config[name]:
            config[name].remat_policy = "none"
    if config.get("task") != "txt2img":
        return config
    for name, defaults in (("diffusion", diffusion_section()), ("sample", sample_section(("",)))):
        section = config[name]
        for key, value in defaults.items():
            if key not in section:
                section[key] = value
    return config
