"""Evaluation: distribution metrics of a set of generated images (``--samples``), or a workdir's own evaluation
(latent diffusion runs on the shapes dataset, first-stage runs by reconstruction; ``--workdir``).

  # FID / KID / IS / CLIP score of a sampling job's images (ldm_jax.sample) against reference images:
  python -m ldm_jax.evaluate --samples=runs/coco30k --reference=/data/coco/val2014 --metrics=fid,kid,clip_score \
      --fid_weights=pt_inception-2015-12-05-6726825d.pth --clip_weights=/models/clip-vit-large-patch14
  # the reference as any data source, or a pytorch-fid statistics file (FID only):
  ... --reference=webdataset:/data/coco/{0000..0009}.tar --reference_image_size=512
  ... --reference=coco_val2014_stats.npz

``--samples``: a sampling job's folder (PNG or WebDataset layout; prompts from its manifest), an image folder, or any
``data.source`` string. ``--reference``: the same kinds (images centre-cropped to ``--reference_image_size``, by
default the samples' size), or an .npz of pytorch-fid statistics (``mu``, ``sigma``). A reference's features are
cached (``--reference_cache``), so a second evaluation against it reads them. Writes ``metrics.json`` into the
samples folder (or ``--out``). How images are resized for each network: ``ldm_jax.evaluation.sample_metrics``.

Workdir evaluation:

  python -m ldm_jax.evaluate --workdir=runs/demo/txt2img --split=heldout --num_examples=256
  python -m ldm_jax.evaluate --workdir=runs/demo/class_cond --split=validation --num_examples=256
  python -m ldm_jax.evaluate --workdir=runs/demo/inpainting --split=heldout      (or a txt2img run with --inpaint)
  python -m ldm_jax.evaluate --workdir=runs/demo/superres --split=validation

txt2img / class_cond: one image per caption (class label) of the first ``num_examples`` examples of ``split``; colour,
position, size, shape and background are read back from the pixels (``ldm_jax.evaluation.attributes``; a class model
is scored on the attributes its class names), and the same reader is run on the dataset's own images as the ceiling.

``--strength=S`` (txt2img / class_cond): each image starts from its example's own image, encoded and noised to
strength S (image-to-image: the last S x num_steps steps), instead of from noise. Set against the reconstructions'
row, it shows at which noise level an attribute is lost: an attribute the model drops at a low strength is lost
while it finishes the picture, not while it lays it out.

Inpainting (an inpainting run, or any txt2img or class_cond run with ``--inpaint``, by latent blending): each
example's object is masked out (a box 0.6 of the image side around its grid cell) and repainted from its caption;
scored as above, plus the PSNR of the kept pixels against the original.

Super-resolution: each example downsampled as in training, upscaled at ``--noise_level``; PSNR and SSIM against the
original, next to bicubic upsampling and the first stage's own reconstruction (the ceiling a latent model can reach).

Autoencoder (first-stage) runs: PSNR, SSIM, L1, LPIPS (``--lpips_vgg_weights`` or the run's), rFID
(``--fid_weights``), codebook usage for VQ models.

Each task scores its own kind (``Task.evaluate_workdir``); an option the run's kind does not take is refused.
Writes ``eval_<split>.json`` (``eval_<split>_inpaint.json`` for ``--inpaint``, ``eval_<split>_strength<S>.json``
for ``--strength``) and a grid next to it; attribute scores also as a markdown table, ``eval_<split>.md``.

Multi-process: the same command in every process with the ``ldm_jax.train`` multi-process flags; generation,
reconstruction and feature extraction are split over every device of every process (each process decodes only the
images its devices score), and process 0 writes the result.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

from ldm_jax import jax_setup, user_errors
from ldm_jax.training import distributed

_WORKDIR = flags.DEFINE_string("workdir", None, "A latent diffusion or first-stage (autoencoder) workdir to evaluate.")
_SAMPLES = flags.DEFINE_string(
    "samples", None, "Generated images to score: a sampling job's folder, an image folder or a data source."
)
_REFERENCE = flags.DEFINE_string(
    "reference", "", "Real images (a folder, a data source) or pytorch-fid statistics (.npz) for FID / KID."
)
_METRICS = flags.DEFINE_string("metrics", "fid", "--samples: comma-separated, from fid, kid, is, clip_score.")
_CLIP_WEIGHTS = flags.DEFINE_string(
    "clip_weights", "", "--samples with clip_score: a Hugging Face CLIPModel folder or an OpenCLIP checkpoint file."
)
_CLIP_ARCH = flags.DEFINE_string(
    "clip_arch",
    "",
    "--clip_weights of an OpenCLIP file whose activation its shapes cannot tell: vit_b16 or vit_l14 (OpenAI, "
    "quick_gelu) or vit_h14 (LAION, gelu); default: inferred, gelu.",
)
_REFERENCE_SIZE = flags.DEFINE_integer(
    "reference_image_size", 0, "Side the reference images are centre-cropped to (0: the samples' size)."
)
_REFERENCE_DATA_DIR = flags.DEFINE_string("reference_data_dir", "", "data_dir of a tfds: reference.")
_REFERENCE_IMAGE_KEY = flags.DEFINE_string("reference_image_key", "image", "Image field of a tfds: reference.")
_REFERENCE_CACHE = flags.DEFINE_string(
    "reference_cache",
    os.environ.get("LDM_JAX_REFERENCE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax", "reference")),
    "Folder of cached reference features ('' = no cache; default $LDM_JAX_REFERENCE_CACHE or ~/.cache/ldm_jax/...).",
)
_SAVE_REFERENCE = flags.DEFINE_string(
    "save_reference_stats", "", "Also write the reference's statistics to this .npz (pytorch-fid's mu / sigma)."
)
_SAVE_SAMPLES = flags.DEFINE_string(
    "save_samples_stats", "", "Also write the samples' statistics to this .npz (pytorch-fid's mu / sigma)."
)
_KID_SUBSETS = flags.DEFINE_integer("kid_subsets", 100, "KID: number of subsets (torch-fidelity's default).")
_KID_SUBSET_SIZE = flags.DEFINE_integer(
    "kid_subset_size", 0, "KID: rows per subset (0: torch-fidelity's 1000, or the smaller set's size below that)."
)
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 16, "--samples: images per device per batch.")
_OUT = flags.DEFINE_string("out", "", "--samples: the result file (default: <samples>/metrics.json).")
_SPLIT = flags.DEFINE_enum(
    "split", "heldout", ["heldout", "validation", "train"], "Dataset split whose examples to use."
)
_NUM = flags.DEFINE_integer("num_examples", 256, "Examples to evaluate on.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Guidance scale (default: config.sample).")
_STEPS = flags.DEFINE_integer("num_steps", None, "Sampler steps (default: config.sample).")
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampler (default: config.sample.sampler).")
_SEED = flags.DEFINE_integer("seed", 1234, "Image i uses seed + i.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per device call.")
_INPAINT = flags.DEFINE_bool("inpaint", False, "txt2img runs: evaluate inpainting by latent blending.")
_STRENGTH = flags.DEFINE_float(
    "strength",
    None,
    "txt2img / class_cond runs: start each image from its example's own image noised to this "
    "strength (image-to-image, in (0, 1]) instead of from noise: what the model keeps of each attribute when it "
    "only draws the last steps.",
)
_NOISE_LEVEL = flags.DEFINE_integer("noise_level", None, "superres runs: noise level (default: config.sample).")
_FID_WEIGHTS = flags.DEFINE_string(
    "fid_weights", "", "Autoencoder runs: FID Inception weights (pytorch-fid's, as .safetensors/.npz) for rFID."
)
_LPIPS_VGG = flags.DEFINE_string(
    "lpips_vgg_weights",
    "",
    "Autoencoder runs: VGG16 weights for LPIPS (default: the run's loss.lpips_vgg_weights when its perceptual term "
    "was on). Lets a run trained without LPIPS be scored with it.",
)
_INITIALIZE_DISTRIBUTED = distributed.define_flags()
_CONFIGURE_JAX = jax_setup.define_flags()
# The options of one mode that the other does not read (--fid_weights serves both).
WORKDIR_FLAGS = ("split", "num_examples", "guidance_scale", "num_steps", "sampler", "seed", "batch_size", "inpaint",
                 "strength", "noise_level", "lpips_vgg_weights")  # fmt: skip
SAMPLES_FLAGS = ("reference", "metrics", "clip_weights", "clip_arch", "reference_image_size", "reference_data_dir",
                 "reference_image_key", "reference_cache", "save_reference_stats", "save_samples_stats",
                 "kid_subsets", "kid_subset_size", "per_device_batch", "out")  # fmt: skip


def _write_result(workdir: str, result: dict, name: str, grid) -> None:
    """Process 0 writes (every process computed the same result from the gathered images)."""
    import jax

    from ldm_jax.imaging import save_png

    if jax.process_index() != 0:
        return
    from ldm_jax import storage

    storage.write_text(storage.join(workdir, f"{name}.json"), json.dumps(result, indent=2))  # whole or not at all
    save_png(storage.join(workdir, f"{name}_grid.png"), grid, upscale=3)
    if "generated" in result and "dataset_images" in result:  # attribute scores: also as a markdown table
        from ldm_jax.evaluation.generation import markdown_table

        storage.write_text(storage.join(workdir, f"{name}.md"), markdown_table(result))
    print(json.dumps(result, indent=2))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ldm_jax import config_lib
    from ldm_jax.tasks import build_task
    from ldm_jax.tasks.protocol import EvalInputs
    from ldm_jax.training.reporting import quiet_library_logs

    quiet_library_logs()
    if (_WORKDIR.value is None) == (_SAMPLES.value is None):
        raise app.UsageError("pass --workdir (evaluate a run) or --samples (score generated images), not both")
    mode, others = ("--samples", WORKDIR_FLAGS) if _SAMPLES.value is not None else ("--workdir", SAMPLES_FLAGS)
    stray = [f"--{f}" for f in others if flags.FLAGS[f].present]
    if stray:
        raise app.UsageError(f"{', '.join(stray)}: not an option of {mode} evaluation")
    if _STRENGTH.value is not None and not 0.0 < _STRENGTH.value <= 1.0:
        raise app.UsageError(
            f"--strength={_STRENGTH.value}: must be in (0, 1] (1: from the image noised to the first step, practically noise)"
        )
    _INITIALIZE_DISTRIBUTED()
    _CONFIGURE_JAX()  # after distributed: it asks for the backend
    if _SAMPLES.value is not None:
        return evaluate_samples()
    workdir = _WORKDIR.value
    from ldm_jax import storage

    storage.check(workdir, "--workdir")
    if _SEED.value < 0 or _SEED.value + _NUM.value > 2**32:
        raise app.UsageError(
            f"--seed={_SEED.value}: example i uses seed + i as a uint32 key; with --num_examples={_NUM.value} use "
            f"a seed in [0, {2**32 - _NUM.value}]"
        )
    try:
        config = config_lib.load_run_config(workdir, "--workdir")
    except FileNotFoundError as e:
        raise app.UsageError(str(e)) from e
    inputs = EvalInputs(
        split=_SPLIT.value,
        num_examples=_NUM.value,
        seed=_SEED.value,
        batch_size=_BATCH.value,
        guidance_scale=_GUIDANCE.value,
        num_steps=_STEPS.value,
        sampler=_SAMPLER.value,
        inpaint=_INPAINT.value,
        strength=_STRENGTH.value,
        noise_level=_NOISE_LEVEL.value,
        fid_weights=_FID_WEIGHTS.value,
        lpips_vgg_weights=_LPIPS_VGG.value,
    )
    try:
        task = build_task(config)
        # Options a task kind does not take are refused, not ignored.
        for name in inputs.given():
            if name not in task.EVAL_OPTIONS:
                raise ValueError(
                    f"--{name} does not apply to a {config.task} run (its options: "
                    f"{', '.join('--' + o for o in task.EVAL_OPTIONS)})"
                )
        t0 = time.perf_counter()
        result, grid, name = task.evaluate_workdir(workdir, inputs)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(str(e)) from e
    logging.info("%s on %s: %s (%.1f s)", config.task, _SPLIT.value, result, time.perf_counter() - t0)
    _write_result(workdir, result, name, grid)


def evaluate_samples() -> None:
    """``--samples`` mode: distribution metrics of generated images."""
    import jax

    from ldm_jax import storage
    from ldm_jax.evaluation import fid, image_sets, sample_metrics
    from ldm_jax.sampling.outputs import write_json
    from ldm_jax.training.sharding import make_mesh

    samples_spec = _SAMPLES.value
    try:
        metrics = sample_metrics.parse_metrics(_METRICS.value)
        if any(m in ("fid", "kid") for m in metrics) and not _REFERENCE.value:
            raise ValueError(f"--metrics={_METRICS.value}: FID and KID compare with --reference, which is not set")
        for name, value in (("per_device_batch", _PER_DEVICE_BATCH.value), ("kid_subsets", _KID_SUBSETS.value)):
            if value < 1:
                raise ValueError(f"--{name}={value}: must be >= 1")
        for name, value in (("out", _OUT.value), ("reference_cache", _REFERENCE_CACHE.value),
                            ("save_reference_stats", _SAVE_REFERENCE.value), ("save_samples_stats", _SAVE_SAMPLES.value)):  # fmt: skip
            storage.check(value, f"--{name}")
        is_job = image_sets.names_job(samples_spec)
        folder = is_job or (not storage.is_url(samples_spec) and os.path.isdir(samples_spec))
        out = _OUT.value or (storage.join(samples_spec, "metrics.json") if folder else "")
        if not out:
            raise ValueError(f"--samples={samples_spec!r} is not a folder to write metrics.json into: pass --out")
        if not is_job and _REFERENCE_SIZE.value < 1:
            raise ValueError(
                f"--samples={samples_spec!r} is not a sampling job's folder: its images are centre-cropped to "
                f"--reference_image_size, which is {_REFERENCE_SIZE.value}; pass the side to score them at"
            )
        networks = sample_metrics.Networks.load(metrics, _FID_WEIGHTS.value, _CLIP_WEIGHTS.value, _CLIP_ARCH.value)
        images = image_sets.open_image_set(samples_spec, _REFERENCE_SIZE.value)
        mesh = make_mesh(-1, 1)
        t0 = time.perf_counter()
        reference, where = None, {}
        if _REFERENCE.value and any(m in ("fid", "kid") for m in metrics):
            size = _REFERENCE_SIZE.value or image_sets.job_image_size(images)
            reference, where = sample_metrics.reference_features(
                _REFERENCE.value, size, mesh, networks, metrics, _PER_DEVICE_BATCH.value, _REFERENCE_CACHE.value,
                _REFERENCE_DATA_DIR.value, _REFERENCE_IMAGE_KEY.value,
            )  # fmt: skip
        t1 = time.perf_counter()
        scored = sample_metrics.score_set(images, mesh, networks, metrics, _PER_DEVICE_BATCH.value, what="samples")
    except (OSError, ValueError) as e:
        raise app.UsageError(str(e)) from e
    if jax.process_index() != 0:
        return  # every process holds the same features; process 0 computes the metrics and writes them
    try:
        values = sample_metrics.compute(scored, reference, metrics, _KID_SUBSETS.value, _KID_SUBSET_SIZE.value)
    except ValueError as e:  # e.g. a --kid_subset_size larger than a set
        raise app.UsageError(str(e)) from e
    result = dict(
        samples=images.description,
        num_samples=scored.count,
        unreadable_samples=scored.bad,
        num_reference=None if reference is None else reference.count,
        unreadable_reference=None if reference is None else reference.bad,
        **where,
        metrics=list(metrics),
        **values,
        inception_resize=sample_metrics.RESIZE_NOTE,
        seconds=dict(
            reference=round(t1 - t0, 3), samples=round(scored.seconds, 3), total=round(time.perf_counter() - t0, 3)
        ),
        processes=jax.process_count(),
        devices=mesh.size,
    )
    if _SAVE_REFERENCE.value and reference is not None and reference.statistics is not None:
        fid.save_statistics(_SAVE_REFERENCE.value, reference.statistics.mean(), reference.statistics.covariance())
    if _SAVE_SAMPLES.value and scored.statistics is not None:
        fid.save_statistics(_SAVE_SAMPLES.value, scored.statistics.mean(), scored.statistics.covariance())
    write_json(out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    user_errors.run(main)
