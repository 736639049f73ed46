"""Sampling job: images from a trained latent diffusion workdir (txt2img, class_cond, unconditional, inpainting or
superres; EMA weights by default) on every device.

  python -m ldm_jax.sample --workdir=runs/demo/txt2img \\
      --prompt="a large red circle in the center on a black background" --num_per_prompt=4 --guidance_scale=3
  # another sampler, a negative prompt:
  ... --sampler=dpmpp_2m --num_steps=20 --karras_sigmas --negative_prompt="white background"
  # image-to-image, and inpainting with any txt2img model (white in the mask = repaint):
  ... --init_image=photo.png --strength=0.7
  ... --init_image=photo.png --mask_image=mask.png
  # class-conditional and unconditional runs:
  python -m ldm_jax.sample --workdir=runs/demo/class_cond --class_label=0 --class_label=13 --num_per_prompt=4
  python -m ldm_jax.sample --workdir=runs/demo/unconditional --num_images=16
  # mask-conditioned inpainting models (configs/inpainting.py, imported SD inpainting checkpoints):
  python -m ldm_jax.sample --workdir=runs/demo/inpainting --init_image=photo.png --mask_image=mask.png --prompt="..."
  # super-resolution (configs/superres.py): each --low_res_image upscaled by superres.scale
  python -m ldm_jax.sample --workdir=runs/demo/superres --low_res_image=a.png --low_res_image=b.png --noise_level=20

A sampling job (``ldm_jax.sampling.job``): the same command on every process of a multi-process run (the
``ldm_jax.train`` flags ``--coordinator_address``, ``--num_processes``, ``--process_id``, their environment variables,
or a detected cluster; ``ENTRY=sample`` for ``launch/tpu_pod.sh`` and ``launch/gpu_slurm.sh``); each batch is split
over every device and each process writes the images its devices made. Writes ``<index>.png`` per image (or
WebDataset shards with ``--output_format=webdataset``), ``manifest.jsonl`` (prompt and id, seed, sampler settings and
checkpoint step per image), ``grid.png`` (one row per prompt, class or input; jobs up to 256 images), ``job.json`` and
``summary.json`` (throughput, per-process counts). Rerunning the same command resumes the job: what is done is skipped,
a killed job's unfinished files are removed and remade; other settings in the same ``--outdir`` are refused by name.
Image ``i`` uses seed ``--seed + i``, and its pixels do not depend on the number of devices or processes.

  # the MLPerf Stable Diffusion protocol's prompts (COCO-2014 val captions: id, image_id, caption), as shards:
  python -m ldm_jax.sample --workdir=runs/sd15 --prompts_file=captions_source.tsv --num_steps=50 \\
      --guidance_scale=8 --output_format=webdataset --outdir=/shared/samples/coco30k

Relative paths in the run's config (the first-stage workdir) are resolved from the current directory, as during
training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from absl import app, flags, logging

from ldm_jax import jax_setup, storage, user_errors
from ldm_jax.training import distributed

_WORKDIR = flags.DEFINE_string("workdir", None, "A latent diffusion training (or converted) workdir.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for several.")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file",
    "",
    "Prompts, one per line (.txt), or one per row with an optional id column (.jsonl, .csv, .tsv: e.g. the MLPerf "
    "COCO captions TSV with id, image_id, caption).",
)
_CAPTION_COLUMN = flags.DEFINE_string(
    "caption_column", "", "The prompt column of a .jsonl/.csv/.tsv --prompts_file (default: caption, prompt or text)."
)
_ID_COLUMN = flags.DEFINE_string("id_column", "", "The id column of a .jsonl/.csv/.tsv --prompts_file (default: id).")
_CLASS_LABEL = flags.DEFINE_multi_integer("class_label", [], "Class-conditional runs: a class id; repeatable.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Unconditional runs: how many images.")
_NUM_PER_PROMPT = flags.DEFINE_integer(
    "num_per_prompt", 1, "Images per prompt (or per class label, or per low-resolution image)."
)
_LOW_RES = flags.DEFINE_multi_string(
    "low_res_image", [], "Super-resolution runs: an image to upscale (all the same square size); repeatable."
)
_NOISE_LEVEL = flags.DEFINE_integer(
    "noise_level", None, "Super-resolution runs: noise augmentation level of the input (default: config.sample)."
)
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (default: config.sample).")
_RESCALE = flags.DEFINE_float("guidance_rescale", None, "Guidance rescale in [0, 1] (default: config.sample).")
_NEGATIVE = flags.DEFINE_string(
    "negative_prompt", None, "Prompt for the unconditional side of guidance (default: config.sample, '' = null)."
)
_SAMPLER = flags.DEFINE_string(
    "sampler", None, "ddpm, ddim, pndm, dpmpp_2m, euler or euler_ancestral (default: config.sample.sampler)."
)
_STEPS = flags.DEFINE_integer("num_steps", None, "Sampler steps (default: config.sample).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta; 0 is deterministic (default: config.sample).")
_SPACING = flags.DEFINE_string("spacing", None, "Timestep spacing: leading, trailing or linspace.")
_KARRAS = flags.DEFINE_bool("karras_sigmas", None, "Karras sigma spacing (dpmpp_2m, euler).")
_SEED = flags.DEFINE_integer("seed", 0, "Image i of the run uses seed + i.")
_PER_DEVICE_BATCH = flags.DEFINE_integer(
    "per_device_batch",
    8,
    "Images per device per batch. Each device then runs the same program whatever the number of devices and "
    "hosts, so the pixels do not depend on them.",
)
_OUTPUT_FORMAT = flags.DEFINE_enum(
    "output_format", "png", ["png", "webdataset"], "png: one file per image; webdataset: tar shards of --shard_size."
)
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 1000, "Images per tar shard (--output_format=webdataset).")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "params"], "Which weights of the checkpoint to use.")
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16"],  # tasks.DTYPES
    "Compute and weight dtype of the networks (default: the run's config.dtype, weights as trained). bfloat16 halves "
    "the weights' memory and uses the accelerator's half-precision units; the sampler's arithmetic stays float32.",
)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 0, "Output height and width in pixels (0: the run's data.image_size); a multiple of the latent grid."
)
_INIT_IMAGE = flags.DEFINE_string(
    "init_image", "", "Image-to-image: start from this image (resized to the output size) instead of noise."
)
_MASK_IMAGE = flags.DEFINE_string(
    "mask_image",
    "",
    "Inpainting (with --init_image): white = repaint, black = keep; any txt2img model (latent blending) or an "
    "inpainting model (mask as input).",
)
_STRENGTH = flags.DEFINE_float(
    "strength", None, "How much of the schedule to run from --init_image, in (0, 1] (default 0.8; 1.0 to inpaint)."
)
_LORA = flags.DEFINE_multi_string(
    "lora",
    [],
    "A LoRA file to apply, PATH[:SCALE] (scale 1 by default): ours (ldm_jax.export --lora_only) or the community's "
    "diffusers/PEFT and kohya .safetensors (pickled .bin/.pt with --allow_pickle); repeatable (their updates add up). Changing a scale does not recompile.",
)
_ALLOW_PICKLE = flags.DEFINE_bool(
    "allow_pickle",
    False,
    "Allow reading pickled --lora files (.bin/.pt/.ckpt) with torch.load(weights_only=True); needs torch.",
)
_OUTDIR = flags.DEFINE_string(
    "outdir", "", "The job's folder (default: <workdir>/samples/<digest of the job>, so a rerun resumes it)."
)
_ON_OTHER_JOB = flags.DEFINE_enum(
    "on_other_job",
    "refuse",
    ["refuse", "move_aside"],  # sampling.job.ON_OTHER_JOB (not imported here: that module imports jax)
    "When --outdir holds a job with other settings (another model, checkpoint, sampler, guidance, prompts ...): "
    "refuse, naming each setting that differs; or move_aside: move that folder whole to <outdir>.before-<k> and "
    "start this job in --outdir.",
)
flags.mark_flags_as_required(["workdir"])
_INITIALIZE_DISTRIBUTED = distributed.define_flags()
_CONFIGURE_JAX = jax_setup.define_flags()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ldm_jax import config_lib
    from ldm_jax.diffusion.guidance import validate_guidance
    from ldm_jax.diffusion.samplers import SamplerOptions
    from ldm_jax.sampling.job import JobSpec, digest, run_job
    from ldm_jax.sampling.prompts import job_prompts
    from ldm_jax.tasks import SAMPLE_FLAGS, build_task, cast_weights, check_sample_flags, load_for_sampling
    from ldm_jax.tasks.protocol import SampleInputs
    from ldm_jax.training.reporting import quiet_library_logs

    quiet_library_logs()
    _INITIALIZE_DISTRIBUTED()
    _CONFIGURE_JAX()  # after distributed: it asks for the backend
    for name, value in (("num_per_prompt", _NUM_PER_PROMPT.value), ("per_device_batch", _PER_DEVICE_BATCH.value),
                        ("shard_size", _SHARD_SIZE.value)):  # fmt: skip
        if value < 1:
            raise app.UsageError(f"--{name}={value}: must be >= 1")
    if _IMAGE_SIZE.value < 0:
        raise app.UsageError(f"--image_size={_IMAGE_SIZE.value}: must be > 0, or 0 for the run's data.image_size")
    # Everything the flags ask is checked against the run's config before any weights load.
    storage.check(_WORKDIR.value, "--workdir")
    storage.check(_OUTDIR.value, "--outdir")
    config_path = storage.join(_WORKDIR.value, "config.json")
    try:
        run_config = config_lib.load_config(config_path)
        prompts = job_prompts(_PROMPT.value, _PROMPTS_FILE.value, _CAPTION_COLUMN.value, _ID_COLUMN.value)
    except (OSError, ValueError) as e:
        raise app.UsageError(str(e)) from e
    inputs = SampleInputs(
        prompts=tuple(p.text for p in prompts),
        negative_prompt=_NEGATIVE.value,
        class_labels=tuple(_CLASS_LABEL.value),
        num_images=_NUM_IMAGES.value,
        low_res_images=tuple(_LOW_RES.value),
        noise_level=_NOISE_LEVEL.value,
        init_image=_INIT_IMAGE.value,
        mask_image=_MASK_IMAGE.value,
        strength=_STRENGTH.value,
        image_size=_IMAGE_SIZE.value,
    )
    overrides = {
        "name": _SAMPLER.value,
        "num_steps": _STEPS.value,
        "eta": _ETA.value,
        "spacing": _SPACING.value,
        "karras_sigmas": _KARRAS.value,
    }
    if _DTYPE.value:
        run_config.dtype = _DTYPE.value
    try:
        request = build_task(run_config).sample_request(inputs)
        s = run_config.sample
        guidance = s.guidance_scale if _GUIDANCE.value is None else _GUIDANCE.value
        rescale = s.guidance_rescale if _RESCALE.value is None else _RESCALE.value
        check_sample_flags(run_config.task, {f for f in SAMPLE_FLAGS if flags.FLAGS[f].present})
        options = SamplerOptions.for_run(run_config, prefix="--", **overrides)
        validate_guidance(guidance, rescale, prefix="--")
    except (OSError, ValueError) as e:  # each names the flag and what is allowed
        raise app.UsageError(str(e)) from e
    image_size = request.image_size or _IMAGE_SIZE.value or run_config.data.image_size
    per = _NUM_PER_PROMPT.value if request.repeats else 1
    images_in = dict(request.images)
    # Prompts carry the ids of their file; other sources (classes, inputs, unconditional images) their position.
    ids = [p.id for p in prompts] if prompts and len(prompts) == len(request.conditions) else None
    sources = []
    for i, describe in enumerate(request.describe):
        extra = prompts[i].extra if ids else {}
        sources.append(dict(id=ids[i] if ids else str(i), **describe, **extra))
    last_seed = _SEED.value + len(sources) * per - 1
    if _SEED.value < 0 or last_seed >= 2**32:  # checked before the job folder is written
        raise app.UsageError(
            f"--seed={_SEED.value}: image i uses seed + i as a uint32 key, so seeds {_SEED.value}..{last_seed} "
            f"must lie in [0, 2**32); use a seed in [0, {2**32 - len(sources) * per}]"
        )
    config_digest = hashlib.sha256(storage.read_bytes(config_path)).hexdigest()
    from ldm_jax.models.lora import parse_lora_flag

    lora_files = [parse_lora_flag(v) for v in _LORA.value]
    lora_model = []
    for path, scale in lora_files:
        if storage.is_url(path):  # read_state_dict reads local files
            raise app.UsageError(f"--lora={path}: a URL; copy the LoRA file to a local path and pass that")
        if not os.path.isfile(path):
            raise app.UsageError(f"--lora={path}: no such file (expected PATH[:SCALE], a LoRA file)")
        with open(path, "rb") as f:
            lora_model.append(dict(sha256=hashlib.sha256(f.read()).hexdigest(), scale=scale))
    spec = JobSpec(
        outdir=_OUTDIR.value,
        # Adapters are part of the model: another file or scale in the same --outdir is refused by name.
        model=dict(config_sha256=config_digest, **({"lora": lora_model} if lora_model else {})),
        settings=dict(
            options.to_config(),
            guidance_scale=guidance,
            guidance_rescale=rescale,
            negative_prompt=request.negative,
            image_size=image_size,
            init_image=_INIT_IMAGE.value,
            mask_image=_MASK_IMAGE.value,
            strength=request.strength if _INIT_IMAGE.value else None,
            weights=_WEIGHTS.value,
            # The per-device program's batch: XLA may sum in another order for another batch, so a pixel can move by
            # a level (measured: 15 of 288 demo images differ between 32 and 4 images per device). The device and
            # host counts do not matter.
            per_device_batch=_PER_DEVICE_BATCH.value,
            # Only when asked for: jobs started before the flag keep their identity.
            **({"dtype": _DTYPE.value} if _DTYPE.value else {}),
        ),
        sources=sources,
        sources_digest=digest([request.conditions, images_in]),
        per_source=per,
        seed=_SEED.value,
        output_format=_OUTPUT_FORMAT.value,
        shard_size=_SHARD_SIZE.value,
    )
    task, params, frozen, mesh, step = load_for_sampling(_WORKDIR.value, _WEIGHTS.value, image_size, config=run_config)
    if lora_files:
        from ldm_jax.tasks.adapters import apply_files

        try:
            params, frozen, applied = apply_files(params, frozen, lora_files, _ALLOW_PICKLE.value)
        except (ValueError, OSError) as e:  # AdapterFileError, WeightFileError: name the file and keys
            raise app.UsageError(str(e)) from e
        for a in applied:
            logging.info(
                "LoRA %s (%s naming) at scale %g: %s modules", a["path"], a["naming"], a["scale"], a["modules"]
            )
    if _DTYPE.value:  # after the adapters are merged: the merged weights are what the sampler reads
        params, frozen = cast_weights(params, frozen, _DTYPE.value)
    # The checkpoint is part of the model: a job continued after more training would mix two models' images.
    spec.settings["checkpoint_step"] = step
    if not spec.outdir:
        # A folder per job under the run: rerunning a command resumes its job, another command starts its own.
        spec = dataclasses.replace(spec, outdir=storage.join(_WORKDIR.value, "samples", digest(spec.identity())[:12]))

    def generate(indices):
        src = [i // per for i in indices]
        kwargs = {k: v[src] if k == "low_res" else v for k, v in images_in.items()}
        return task.generate_batches(
            params,
            frozen,
            mesh,
            [request.conditions[j] for j in src],
            [spec.seed + i for i in indices],
            options,
            guidance,
            rescale,
            request.negative,
            _PER_DEVICE_BATCH.value * mesh.size,
            init_image=kwargs.get("init"),
            mask=kwargs.get("mask"),
            strength=request.strength,
            low_res=kwargs.get("low_res"),
        )

    try:
        run_job(spec, generate, _PER_DEVICE_BATCH.value * mesh.size, mesh.size, _ON_OTHER_JOB.value)
    except ValueError as e:  # the folder holds another job, or inputs the model cannot take (before device work)
        raise app.UsageError(str(e)) from e


if __name__ == "__main__":
    user_errors.run(main)
