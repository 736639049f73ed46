"""Condition-following evaluation of a txt2img or class_cond workdir on the shapes dataset.

  python -m ldm_jax.evaluate --workdir=runs/demo/txt2img --split=heldout --num_examples=256
  python -m ldm_jax.evaluate --workdir=runs/demo/class_cond --split=validation --num_examples=256

Generates one image per caption (txt2img) or class label (class_cond) of the first ``num_examples`` examples of
``split`` and reads colour, position, size, shape and background back from the pixels
(``ldm_jax.evaluation.attributes``); a class-conditional model is scored on the attributes its class names. The same reader is run on the
dataset's own images of those captions, as the evaluator's ceiling. Writes ``eval_<split>.json`` and a grid.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "A txt2img training workdir.")
_SPLIT = flags.DEFINE_enum(
    "split", "heldout", ["heldout", "validation", "train"], "Dataset split whose captions to use."
)
_NUM = flags.DEFINE_integer("num_examples", 256, "Captions to generate for.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Guidance scale (default: config.sample).")
_STEPS = flags.DEFINE_integer("num_steps", None, "Sampler steps (default: config.sample).")
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampler (default: config.sample.sampler).")
_SEED = flags.DEFINE_integer("seed", 1234, "Image i uses seed + i.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per device call.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import numpy as np

    from ldm_jax.data import pipeline
    from ldm_jax.evaluation import attributes
    from ldm_jax.imaging import make_grid, save_png
    from ldm_jax.data import shapes
    from ldm_jax.tasks import load_for_sampling
    from ldm_jax import jax_setup
    from ldm_jax.training.reporting import quiet_library_logs

    quiet_library_logs()
    jax_setup.configure()
    try:
        task, params, frozen, mesh, step = load_for_sampling(_WORKDIR.value, tasks=("txt2img", "class_cond"))
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(str(e)) from e
    source = pipeline.data_source(task.config.data, _SPLIT.value)
    n = min(_NUM.value, len(source))
    if n < 1:
        raise app.UsageError(f"--num_examples={_NUM.value}: must be >= 1")
    examples = [source[i] for i in range(n)]
    prompts = [e["caption"].decode("utf-8") if isinstance(e["caption"], bytes) else str(e["caption"]) for e in examples]
    if task.config.task == "txt2img":
        conditions, wanted = prompts, [attributes.parse_caption(p) for p in prompts]
        negative = task.config.sample.negative_prompt
    else:  # class_cond: the examples' class labels; only the attributes the class names are scored
        labeling = task.config.classes
        conditions = [shapes.class_label(e, labeling) for e in examples]
        wanted = [{a: int(e[a]) for a in shapes.LABELINGS[labeling]} for e in examples]
        negative = None
    s = task.config.sample
    guidance = s.guidance_scale if _GUIDANCE.value is None else _GUIDANCE.value
    overrides = {"num_steps": _STEPS.value, "name": _SAMPLER.value}
    try:
        options = task.sampler_options(**overrides)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    steps = options.num_steps
    t0 = time.perf_counter()
    images = task.generate_images(
        params,
        frozen,
        mesh,
        conditions,
        [_SEED.value + i for i in range(n)],
        options,
        guidance,
        s.guidance_rescale,
        negative,
        _BATCH.value,
    )
    seconds = time.perf_counter() - t0
    generated = attributes.score_wanted(images, wanted)
    ceiling = attributes.score_wanted([e["image"] for e in examples], wanted)
    result = dict(
        split=_SPLIT.value,
        checkpoint_step=step,
        sampler=options.name,
        num_steps=steps,
        guidance_scale=guidance,
        generated=generated,
        dataset_images=ceiling,
        chance={
            k: v
            for k, v in {
                "accuracy/color": 1 / 6,
                "accuracy/position": 1 / 9,
                "accuracy/size": 1 / 2,
                "accuracy/shape": 1 / 3,
                "accuracy/background": 1 / 3,
            }.items()
            if k in generated
        },
        generation_seconds=seconds,
    )
    path = os.path.join(_WORKDIR.value, f"eval_{_SPLIT.value}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    k = min(32, n)
    real = np.stack([e["image"] for e in examples[:k]])
    save_png(
        os.path.join(_WORKDIR.value, f"eval_{_SPLIT.value}_grid.png"),
        make_grid(np.concatenate([real, images[:k]]), ncol=8),
        upscale=3,
    )
    for name, res in (("generated", generated), ("dataset images", ceiling)):
        logging.info("%s on %s (%d prompts): %s", name, _SPLIT.value, n, {k: round(v, 3) for k, v in res.items()})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main)
