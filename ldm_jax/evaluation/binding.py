"""Condition binding: how much a trained model's denoising relies on each attribute its condition names.

Each dataset example's own latents are noised to a few timesteps and denoised twice with the same noise: under the
example's condition, and under the condition with one attribute changed to another value (a caption written with
another colour, shape, ...; another class label). The loss (the run's prediction target, unweighted) rises by as
much as the model uses that attribute at that noise level; a model that ignores a word denoises as well when told
the wrong one (0). Sampling and reading attributes back from pixels (``evaluation.generation``) say whether the
pictures follow the prompt; this says, without a sampler or a pixel reader, which words the UNet has learned, and
at which noise levels: a shape the first stage keeps but the samples lose, with a near-zero shape row here, is a
word the UNet never learned to draw (README, Two commands: the demo model's table).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import rng_streams
from ldm_jax.data import pipeline, shapes
from ldm_jax.diffusion import objectives
from ldm_jax.training import transfer
from ldm_jax.training.sharding import batch_sharding, replicated

# Low, middle and high noise of a 1000-step schedule (scaled to the run's ``num_train_timesteps``).
TIMESTEPS = (100, 300, 500)
_CAPTION_ORDER = ("shape", "color", "size", "position", "background")  # shapes.caption's arguments


def changed_examples(examples, attribute: str) -> tuple[list[dict], list[tuple[int, int]]]:
    """Copies of ``examples`` whose ``attribute`` names another value, and each one's (true, changed) value
    indices. Example i takes the value ``1 + i mod (n - 1)`` places after its own, so every other value is asked
    about equally often; the caption is rewritten from the attributes (``shapes.caption``)."""
    names = shapes.ATTRIBUTE_VALUES[attribute]
    out, pairs = [], []
    for i, e in enumerate(examples):
        true = int(e[attribute])
        other = (true + 1 + i % (len(names) - 1)) % len(names)
        values = {a: int(e[a]) for a in shapes.ATTRIBUTE_VALUES}
        values[attribute] = other
        changed = dict(e, **values)
        changed["caption"] = shapes.caption(*(shapes.ATTRIBUTE_VALUES[a][values[a]] for a in _CAPTION_ORDER))
        out.append(changed)
        pairs.append((true, other))
    return out, pairs


def _latents_program(task):
    """Jitted ``(frozen, images [B, H, W, 3], seeds [B]) -> (scaled latents, noise)``, each example's posterior
    sample and noise drawn from its own seed: the same on both sides of every comparison."""

    def fn(frozen, images, seeds):
        keys = jax.vmap(jax.random.key)(seeds)
        z0 = task.latents.encode_images(frozen["first_stage"], images, keys) * frozen["latent_scale"]
        noise = jax.vmap(
            lambda k: jax.random.normal(jax.random.fold_in(k, rng_streams.BINDING_NOISE), z0.shape[1:], z0.dtype)
        )(keys)
        return z0, noise

    return jax.jit(fn)


def _loss_program(task):
    """Jitted ``(params, frozen, cond_inputs, z0, noise, t) -> per-example loss [B]`` at timestep ``t``."""
    cfg = task.config.diffusion

    def fn(params, frozen, cond_inputs, z0, noise, t):
        cond = task.conditioner.encode(params, frozen, cond_inputs)
        tt = jnp.full((z0.shape[0],), t, jnp.int32)
        x_t = objectives.add_noise(task.schedule, z0, noise, tt)
        out = task.apply_unet(params, x_t, tt, cond)
        target = objectives.training_target(cfg.prediction_type, task.schedule, z0, noise, tt)
        return objectives.per_example_loss(out, target)

    return jax.jit(fn)


def condition_binding(task, params, frozen, mesh, examples, wanted, seed: int = 0, batch_size: int = 0) -> dict:
    """The loss increase under a changed attribute, per attribute that ``wanted`` names and per timestep:
    ``{"timesteps": [...], "loss": {t: mean loss under the true condition}, "increase": {attribute: {t: mean
    (changed - true) / mean true}}, "shape_pairs": {"circle->square": {t: ...}, ...}}``.

    ``examples`` are shapes-dataset examples (image, caption, attributes); a task whose UNet takes concatenated
    inputs (inpainting, super-resolution) is not measured this way (ValueError). Every process must call this with
    the same arguments; batches are split over ``mesh``'s devices (``batch_size`` 0: 16 per device)."""
    if task.concat.channels:
        raise ValueError("condition binding measures a model without concatenated inputs (txt2img, class_cond)")
    attrs = [a for a in shapes.ATTRIBUTE_VALUES if all(a in w for w in wanted)]
    n = len(examples)
    steps = [int(round(t * task.schedule.num_train_timesteps / 1000)) for t in TIMESTEPS]
    variants = {"": (examples, None)}
    for a in attrs:
        variants[a] = changed_examples(examples, a)
    conditions = {a: task.conditioner.eval_conditions(ex)[0] for a, (ex, _) in variants.items()}

    per_call = transfer.rows_per_call(batch_size or 16 * mesh.size, mesh.size)
    rows, repl = batch_sharding(mesh), replicated(mesh)
    loss_fn = _loss_program(task)
    prepare = _latents_program(task)
    images = pipeline.to_model_range(np.stack([np.asarray(e["image"]) for e in examples]))
    losses = {a: np.zeros((len(steps), n), np.float32) for a in variants}
    for start, m, idx in transfer.padded_batches(n, per_call):
        seeds = np.asarray([seed + i for i in idx], np.uint32)
        z0, noise = prepare(frozen, *transfer.to_mesh((images[idx], seeds), rows))
        for a in variants:
            cond = transfer.to_mesh(task.conditioner.condition_inputs([conditions[a][i] for i in idx]), rows)
            for j, t in enumerate(steps):
                t_in = transfer.to_mesh(np.int32(t), repl)
                losses[a][j, start : start + m] = transfer.to_host(loss_fn(params, frozen, cond, z0, noise, t_in))[:m]

    base = losses[""]
    result = {"timesteps": steps, "loss": {t: float(base[j].mean()) for j, t in enumerate(steps)}, "increase": {}}
    for a in attrs:
        gain = losses[a] - base
        result["increase"][a] = {t: float(gain[j].mean() / base[j].mean()) for j, t in enumerate(steps)}
    if "shape" in attrs:
        pairs = variants["shape"][1]
        result["shape_pairs"] = {}
        for p, q in sorted(set(pairs)):
            sel = np.asarray([pair == (p, q) for pair in pairs])
            name = f"{shapes.SHAPES[p]}->{shapes.SHAPES[q]}"
            result["shape_pairs"][name] = {
                t: float((losses["shape"][j, sel] - base[j, sel]).mean() / base[j, sel].mean())
                for j, t in enumerate(steps)
            }
    return result


def markdown_table(binding: dict) -> str:
    """``condition_binding``'s result as a markdown table: a row per attribute (and per shape pair), a column per
    timestep."""
    steps = binding["timesteps"]
    out = ["| loss increase when the condition names another | " + " | ".join(f"t={t}" for t in steps) + " |"]
    out.append("|---" * (len(steps) + 1) + "|")
    rows = list(binding["increase"].items()) + [(f"shape {k}", v) for k, v in binding.get("shape_pairs", {}).items()]
    out += [f"| {name} | " + " | ".join(f"{row[t]:+.3f}" for t in steps) + " |" for name, row in rows]
    out.append("| (loss under the true condition) | " + " | ".join(f"{binding['loss'][t]:.4f}" for t in steps) + " |")
    return "\n".join(out) + "\n"
