"""Scoring generated images of the shapes dataset by the attributes their conditions ask for.

One image per example's condition (caption or class label); colour, position, size, shape and background are read
back from the pixels (``evaluation.attributes``; a class model is scored on the attributes its class names), and
the same reader is run on the dataset's own images and on the first stage's reconstructions of them (the ceiling a
latent model can reach), with shape accuracy broken down by shape and size. Inpainting (a mask-conditioned model, or any
other by latent blending): each example's object is masked out (a box ``OBJECT_BOX_HALF`` x 2 of the image side
around its grid cell) and repainted from its condition; scored as above, plus the PSNR of the kept pixels.
"""

from __future__ import annotations

import jax
import numpy as np

from ldm_jax.data import pipeline
from ldm_jax.evaluation import attributes, binding, image_metrics
from ldm_jax.imaging import to_uint8

CHANCE = {
    "accuracy/color": 1 / 6,
    "accuracy/position": 1 / 9,
    "accuracy/size": 1 / 2,
    "accuracy/shape": 1 / 3,
    "accuracy/background": 1 / 3,
}
# Half the side of the box masked around an object's grid cell centre, as a fraction of the image side: covers the
# largest shape (radius 0.19, triangles reach 0.25) with the centre jitter.
OBJECT_BOX_HALF = 0.3


def object_masks(examples, size: int) -> np.ndarray:
    """float32 [N, size, size, 1]: 1 in a box around each example's object (from its position attribute)."""
    masks = np.zeros((len(examples), size, size, 1), np.float32)
    half = OBJECT_BOX_HALF * size
    for i, e in enumerate(examples):
        row, col = divmod(int(e["position"]), 3)
        cy, cx = (row + 0.5) / 3 * size, (col + 0.5) / 3 * size
        top, left = max(int(round(cy - half)), 0), max(int(round(cx - half)), 0)
        masks[i, top : int(round(cy + half)), left : int(round(cx + half))] = 1.0
    return masks


def score_attributes(task, params, frozen, mesh, examples, options, seeds, inputs, inpaint_mode: str | None):
    """(result, grid rows) of ``task``'s images for ``examples``; ``inpaint_mode`` names how the model inpaints
    (None: generate from the condition alone)."""
    conditions, wanted, negative = task.conditioner.eval_conditions(examples)
    originals = np.stack([e["image"] for e in examples])
    in_model_range = pipeline.to_model_range(originals)
    s = task.config.sample
    guidance = s.guidance_scale if inputs.guidance_scale is None else inputs.guidance_scale
    extra = {}
    if inpaint_mode:
        masks = object_masks(examples, task.config.data.image_size)
        extra = dict(init_image=in_model_range, mask=masks)
    if inputs.strength is not None:
        # From each example's own image, noised to this strength (with --inpaint: inpainting from it).
        extra.update(init_image=in_model_range, strength=inputs.strength)
    images = task.generate_images(
        params, frozen, mesh, conditions, seeds, options, guidance, s.guidance_rescale, negative, inputs.batch_size,
        **extra,
    )  # fmt: skip
    # The first stage's reconstructions of the same images: the ceiling a latent model can reach (what the
    # autoencoder already loses, no UNet can draw back).
    recon = to_uint8(jax.jit(task.latents.reconstruct)(task.host_first_stage(frozen), in_model_range))
    result = dict(guidance_scale=guidance)
    if inputs.strength is not None:
        result["from_dataset_images_at_strength"] = inputs.strength
    # Each image set read once: the attribute scores, shape accuracy per kind and the shape confusion all come from
    # the same readings (4-5 ms an image on a 2-core CPU, mostly the shape reader's template search).
    reports = {
        name: attributes.report(list(x), wanted)
        for name, x in (("generated", images), ("dataset_images", originals), ("reconstructions", recon))
    }
    result.update({name: scores for name, (scores, _, _) in reports.items()})
    result["shape_by_kind"] = {name: by_kind for name, (_, by_kind, _) in reports.items()}
    # The dataset's images are left out: the reader reads them right (its own tests), so theirs is the identity.
    result["shape_confusion"] = {name: reports[name][2] for name in ("generated", "reconstructions")}
    result["chance"] = {k: v for k, v in CHANCE.items() if k in result["generated"]}
    if not inpaint_mode and inputs.strength is None and not task.concat.channels:
        # Which words the UNet uses at all (no sampler, no pixel reader): the loss under a changed attribute.
        result["condition_binding"] = binding.condition_binding(
            task, params, frozen, mesh, examples, wanted, seed=seeds[0], batch_size=inputs.batch_size
        )
    rows = [originals, images]
    if inpaint_mode:
        keep = 1.0 - masks
        result["inpainting"] = dict(
            mode=inpaint_mode,
            masked_fraction=float(np.mean(masks)),
            kept_region_psnr=float(np.mean(image_metrics.psnr(images, originals, where=keep))),
        )
        rows = [originals, to_uint8(in_model_range * keep), images]
    return result, rows


def markdown_table(result: dict) -> str:
    """The attribute scores of ``score_attributes``' result as markdown: per attribute, the dataset's images, the
    first stage's reconstructions and the samples (what the demo prints and the README shows)."""
    rows = [k for k in ("dataset_images", "reconstructions", "generated") if k in result]
    attrs = [a for a in result["generated"] if a.startswith("accuracy/")]
    strength = result.get("from_dataset_images_at_strength")
    names = {
        "dataset_images": "dataset images",
        "reconstructions": "first-stage reconstructions",
        "generated": "samples" if strength is None else f"samples from the dataset images at strength {strength:g}",
    }
    out = ["| | " + " | ".join(a.removeprefix("accuracy/") for a in attrs) + " |", "|---" * (len(attrs) + 1) + "|"]
    out += [f"| {names[r]} | " + " | ".join(f"{result[r][a]:.3f}" for a in attrs) + " |" for r in rows]
    kinds = result.get("shape_by_kind", {})
    keys = list(kinds.get("generated", {}))
    if keys:  # none for conditions without a size (class labels are colour x shape): no empty table
        out += ["", "| shape accuracy | " + " | ".join(k.removeprefix("shape/") for k in keys) + " |"]
        out += ["|---" * (len(keys) + 1) + "|"]
        out += [f"| {names[r]} | " + " | ".join(f"{kinds[r][k]:.3f}" for k in keys) + " |" for r in rows if r in kinds]
    confusion = result.get("shape_confusion", {})
    if confusion.get("generated"):
        # One row per asked shape and image set: a model that ignores the shape has the same row for every shape.
        reads = list(next(iter(confusion["generated"].values())))
        out += ["", "| shape asked, read as: | " + " | ".join(reads) + " |", "|---" * (len(reads) + 1) + "|"]
        for r in ("reconstructions", "generated"):
            for asked, row in confusion.get(r, {}).items():
                out.append(f"| {asked}, {names[r]} | " + " | ".join(f"{row[k]:.3f}" for k in reads) + " |")
    if "condition_binding" in result:
        out += ["", binding.markdown_table(result["condition_binding"]).rstrip("\n")]
    return "\n".join(out) + "\n"
