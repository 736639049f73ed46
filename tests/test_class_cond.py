"""Class-conditional and unconditional latent diffusion: labels, training, guided sampling, the CLI."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli import run_module
from compile_count import count_generate_traces
from tiny_runs import train_tiny

from ldm_jax.data import pipeline, shapes


@pytest.fixture(scope="module")
def class_cond_workdir(tmp_path_factory, data_dir, first_stage_workdir):
    from configs import class_cond

    return train_tiny(class_cond, data_dir, first_stage_workdir, tmp_path_factory, "class_cond", preview_every=8)


@pytest.fixture(scope="module")
def unconditional_workdir(tmp_path_factory, data_dir, first_stage_workdir):
    from configs import unconditional

    return train_tiny(unconditional, data_dir, first_stage_workdir, tmp_path_factory, "unconditional", preview_every=8)


def test_labels_follow_the_attributes_in_the_caption(data_dir):
    from configs import class_cond

    config = class_cond.get_config("tiny")
    config.data.data_dir = data_dir
    source = pipeline.data_source(config.data, "train")
    prep = pipeline.Preprocess(None, "shape_color")
    for i in range(20):
        example = source[i]
        label = int(prep.map(example)["label"])
        caption = example["caption"].decode() if isinstance(example["caption"], bytes) else example["caption"]
        assert 0 <= label < shapes.num_classes("shape_color") == 18
        assert shapes.class_name(label, "shape_color") in caption  # e.g. "red circle"


def test_class_labels_condition_the_model_and_dropout_uses_the_null_class(class_cond_workdir):
    from ldm_jax.tasks import load_for_sampling

    task, params, frozen, mesh, step = load_for_sampling(class_cond_workdir)
    assert step == 8 and task.conditioner.num_classes == 18
    # The class embedding has a row for the null class that guidance uses.
    assert params["unet"]["class_embedding"]["embedding"].shape[0] == 19
    drop = jnp.array([True, False, True, False])
    labels = task.conditioner.training_condition(params, frozen, {"label": jnp.array([3, 4, 5, 6])}, drop)
    np.testing.assert_array_equal(labels, [18, 4, 18, 6])
    options = task.sampler_options(num_steps=4)
    traces = count_generate_traces(task)
    a = task.generate_images(params, frozen, mesh, [0, 13], [7, 7], options, 4.0, batch_size=8)
    b = task.generate_images(params, frozen, mesh, [13, 0], [7, 7], options, 4.0, batch_size=8)
    c = task.generate_images(params, frozen, mesh, [13], [7], options, 2.0, batch_size=8)
    assert a.shape == (2, 16, 16, 3) and c.shape == (1, 16, 16, 3)
    # Same seed, different class: different images; the class (not the position in the batch) decides.
    assert np.abs(a[0].astype(int) - a[1].astype(int)).max() > 0
    np.testing.assert_array_equal(a[::-1], b)
    assert len(traces) == 1  # labels and guidance changed, one program
    with pytest.raises(ValueError, match=r"class labels \[18\]: must be integers in \[0, 18\)"):
        task.generate_images(params, frozen, mesh, [18], [0], options, 4.0)

    # Condition binding asks about the attributes the class names (colour and shape), by changing the label.
    from ldm_jax.data import pipeline
    from ldm_jax.evaluation import binding

    examples = [pipeline.data_source(task.config.data, "validation")[i] for i in range(8)]
    labels, wanted, _ = task.conditioner.eval_conditions(examples)
    changed, _ = binding.changed_examples(examples, "shape")
    changed_labels = task.conditioner.eval_conditions(changed)[0]
    assert all(p // 3 == q // 3 and p != q for p, q in zip(labels, changed_labels, strict=True))  # colour kept
    result = binding.condition_binding(task, params, frozen, mesh, examples, wanted, batch_size=8)
    assert set(result["increase"]) == {"color", "shape"}
    assert all(np.isfinite(v) for row in result["increase"].values() for v in row.values())
    assert any(v != 0.0 for row in result["increase"].values() for v in row.values())


@pytest.fixture(scope="module")
def class_token_workdir(tmp_path_factory, data_dir, first_stage_workdir):
    from configs import class_cond

    def cross_attention(config):
        config.class_conditioning = "cross_attention"

    return train_tiny(
        class_cond, data_dir, first_stage_workdir, tmp_path_factory, "class_token", configure=cross_attention
    )


def test_class_token_conditions_through_cross_attention(class_token_workdir):
    """class_conditioning='cross_attention' (LDM's class-conditional models): a trained table of 18 + 1 class
    tokens is the cross-attention's one-token context; the UNet has no class embedding; the null row is what a
    dropped example and guidance's unconditional pass see; the label decides the image."""
    from ldm_jax.tasks import load_for_sampling

    task, params, frozen, mesh, step = load_for_sampling(class_token_workdir)
    table = params["class_embedding"]["embedding"]
    assert step == 8 and table.shape == (19, 32) and "class_embedding" not in params["unet"]
    assert task.conditioner.unet_classes == 0 and task.conditioner.context_dim == 32
    # Trained: the rows moved from their initial values (the 8 steps' gradients reached the table).
    init = task.init_params(jax.random.key(0))["class_embedding"]["embedding"]
    assert np.abs(np.asarray(table) - np.asarray(init)).max() > 0
    drop = jnp.array([True, False])
    context = task.conditioner.training_condition(params, frozen, {"label": jnp.array([3, 4])}, drop)
    assert context.shape == (2, 1, 32)
    np.testing.assert_allclose(context[:, 0], np.asarray(table)[[18, 4]], rtol=1e-6)
    options = task.sampler_options(num_steps=4)
    a = task.generate_images(params, frozen, mesh, [0, 13], [7, 7], options, 4.0, batch_size=8)
    b = task.generate_images(params, frozen, mesh, [13, 0], [7, 7], options, 4.0, batch_size=8)
    assert np.abs(a[0].astype(int) - a[1].astype(int)).max() > 0
    np.testing.assert_array_equal(a[::-1], b)


def test_unconditional_run_samples_without_guidance(unconditional_workdir, tmp_path):
    outdir = tmp_path / "out"
    cmd = ["ldm_jax.sample", f"--workdir={unconditional_workdir}", "--num_images=3"]
    cmd += ["--num_steps=3", "--sampler=euler_ancestral", f"--outdir={outdir}"]
    proc = run_module(*cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (outdir / "manifest.jsonl").read_text().splitlines()]
    assert [x["seed"] for x in lines] == [0, 1, 2] and "prompt" not in lines[0]
    previews = os.listdir(os.path.join(unconditional_workdir, "previews"))
    assert previews == ["samples_0000008.png"]


def test_sample_cli_for_class_runs_names_bad_input(class_cond_workdir, tmp_path):
    base = ["ldm_jax.sample", f"--workdir={class_cond_workdir}", "--num_steps=3"]
    outdir = tmp_path / "out"
    proc = run_module(*base, "--class_label=1", "--class_label=16", "--num_per_prompt=2", f"--outdir={outdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (outdir / "manifest.jsonl").read_text().splitlines()]
    assert [x["class_label"] for x in lines] == [1, 1, 16, 16]
    assert lines[0]["class_name"] == "red square" and lines[2]["class_name"] == "cyan square"
    for extra, message in (
        ([], "pass --class_label"),
        (["--class_label=99"], "--class_label=[99]: must be in [0, 18)"),
        (
            ["--class_label=1", "--prompt=a red square"],
            "--prompt, --prompts_file and --negative_prompt need a text-conditioned run",
        ),
    ):
        bad = tmp_path / "bad"
        proc = run_module(*base, *extra, f"--outdir={bad}")
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
        assert not bad.exists()


def test_unet_checks_its_conditioning_inputs():
    from ldm_jax.models.unet import UNET_VARIANTS, UNet

    kw = dict(UNET_VARIANTS["tiny"], block_out_channels=(16, 32), num_heads=(2, 2), norm_groups=8)
    x, t = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="needs class_labels"):
        UNet(context_dim=0, num_classes=3, **kw).init(jax.random.key(0), x, t)
    with pytest.raises(ValueError, match="context must be given exactly when context_dim > 0"):
        UNet(context_dim=8, **kw).init(jax.random.key(0), x, t)
