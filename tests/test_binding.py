"""Condition binding (``ldm_jax.evaluation.binding``): the loss increase when the condition names another value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def test_changed_examples_name_every_other_value_in_turn_and_keep_the_rest():
    from ldm_jax.data import shapes
    from ldm_jax.evaluation import attributes, binding

    examples = [shapes.generate_example("validation", i, 16, 0) for i in range(36)]
    for attr, names in shapes.ATTRIBUTE_VALUES.items():
        changed, pairs = binding.changed_examples(examples, attr)
        others = [q for _, q in pairs]
        for e, c, (p, q) in zip(examples, changed, pairs, strict=True):
            assert p == e[attr] and q != p and 0 <= q < len(names)
            read = attributes.parse_caption(c["caption"])
            # The caption says the changed value and every other attribute as before.
            assert read == {a: (q if a == attr else int(e[a])) for a in shapes.ATTRIBUTE_VALUES}, c["caption"]
            assert c[attr] == q and np.array_equal(c["image"], e["image"])
        # Examples of one value ask about each other value in turn, so every value is asked about somewhere.
        assert len(set(others)) == len(names), attr
    same = [e for e in examples if e["shape"] == 0][:4]
    assert [q for _, q in binding.changed_examples(same, "shape")[1]] == [1, 2, 1, 2]


def _losses(task, params, frozen, examples, captions, seeds, t):
    """Each example's loss at timestep t under ``captions``, on one device, written out from the definition."""
    from ldm_jax import rng_streams
    from ldm_jax.diffusion import objectives

    images = jnp.asarray(np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1.0)
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    z0 = task.latents.encode_images(frozen["first_stage"], images, keys) * frozen["latent_scale"]
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, rng_streams.BINDING_NOISE), z0.shape[1:]))(keys)
    tt = jnp.full((len(examples),), t, jnp.int32)
    x_t = objectives.add_noise(task.schedule, z0, noise, tt)
    cond = task.conditioner.encode(params, frozen, jnp.asarray(task.conditioner.condition_inputs(captions)))
    out = task.apply_unet(params, x_t, tt, cond)
    target = objectives.training_target(task.config.diffusion.prediction_type, task.schedule, z0, noise, tt)
    return np.asarray(jnp.mean(jnp.square(out - target), axis=(1, 2, 3)))


def test_condition_binding_is_the_loss_increase_and_zero_for_a_model_that_ignores_the_condition(txt2img_workdir):
    from ldm_jax.data import pipeline
    from ldm_jax.evaluation import binding, generation
    from ldm_jax.tasks import load_for_sampling

    task, params, frozen, mesh, _ = load_for_sampling(txt2img_workdir)
    assert mesh.size == 8
    source = pipeline.data_source(task.config.data, "validation")
    examples = [source[i] for i in range(11)]  # two batches of 8, the second padded with repeats
    _, wanted, _ = task.conditioner.eval_conditions(examples)
    result = binding.condition_binding(task, params, frozen, mesh, examples, wanted, seed=3, batch_size=8)
    steps = result["timesteps"]
    assert steps == list(binding.TIMESTEPS) and set(result["increase"]) == {
        "color", "position", "size", "shape", "background"
    }  # fmt: skip

    # Against the definition, on one device: the mean loss under each changed caption over the mean true loss.
    seeds = [3 + i for i in range(11)]
    captions = [e["caption"].decode() if isinstance(e["caption"], bytes) else e["caption"] for e in examples]
    for t in steps:
        true = _losses(task, params, frozen, examples, captions, seeds, t)
        np.testing.assert_allclose(result["loss"][t], true.mean(), rtol=1e-4)
        for attr in ("color", "shape"):
            changed, _ = binding.changed_examples(examples, attr)
            other = _losses(task, params, frozen, examples, [c["caption"] for c in changed], seeds, t)
            np.testing.assert_allclose(result["increase"][attr][t], other.mean() / true.mean() - 1, atol=1e-4)
    # The trained model uses its captions (8 steps: a little); the shape pairs split the shape row.
    assert any(abs(v) > 1e-5 for row in result["increase"].values() for v in row.values())
    assert set(result["shape_pairs"]) <= {f"{p}->{q}" for p in ("circle", "square", "triangle")
                                          for q in ("circle", "square", "triangle") if p != q}  # fmt: skip

    # A text encoder with every weight zero gives every caption the same context: no word changes the loss.
    blind = dict(params, text=jax.tree.map(jnp.zeros_like, params["text"]))
    zero = binding.condition_binding(task, blind, frozen, mesh, examples, wanted, seed=3, batch_size=8)
    assert all(v == 0.0 for row in zero["increase"].values() for v in row.values()), zero["increase"]
    assert all(v == 0.0 for row in zero["shape_pairs"].values() for v in row.values())

    table = generation.markdown_table(
        {"generated": {"accuracy/color": 1.0}, "dataset_images": {"accuracy/color": 1.0}, "condition_binding": result}
    ).splitlines()
    assert f"| loss increase when the condition names another | t={steps[0]} | t={steps[1]} | t={steps[2]} |" in table
    assert any(line.startswith("| shape | ") for line in table)


def test_condition_binding_refuses_a_model_with_concatenated_inputs():
    from ldm_jax.evaluation import binding

    class Task:
        class concat:  # noqa: N801 (stands in for a concat-input object)
            channels = 9

    with pytest.raises(ValueError, match="without concatenated inputs"):
        binding.condition_binding(Task(), None, None, None, [], [])
