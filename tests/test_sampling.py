import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_training_wrote_logs_previews_and_config(txt2img_workdir):
    files = os.listdir(txt2img_workdir)
    assert "config.json" in files and "checkpoints" in files
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(txt2img_workdir, "tensorboard")))
    previews = sorted(os.listdir(os.path.join(txt2img_workdir, "previews")))
    assert previews == ["samples_0000004.png", "samples_0000008.png"]


def test_generation_does_not_recompile_across_prompts_seeds_and_guidance(txt2img_workdir):
    from ldm_jax.tasks.txt2img import load_for_sampling

    task, params, frozen, mesh, step = load_for_sampling(txt2img_workdir)
    assert step == 8 and mesh.size == 8
    kw = dict(num_steps=3, eta=0.0, spacing="leading", batch_size=8)
    a = task.generate_images(
        params, frozen, mesh, ["a small red circle in the center on a black background"] * 3, [0, 1, 2], 2.0, **kw
    )
    b = task.generate_images(
        params, frozen, mesh, ["a large blue square at the top on a white background"] * 3, [5, 6, 7], 7.5, **kw
    )
    c = task.generate_images(
        params, frozen, mesh, ["a large blue square at the top on a white background"], [6], 7.5, **kw
    )
    assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8
    fn = task.compiled_generate(mesh, 3, 0.0, "leading")
    assert fn._cache_size() == 1
    # An image depends on its own seed and prompt, not on the batch it was generated in.
    np.testing.assert_array_equal(b[1], c[0])


def test_sample_cli_writes_pngs_grid_and_manifest(txt2img_workdir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "a small red circle in the center on a black background\n\na large blue square at the top on a white background\n"
    )
    outdir = tmp_path / "out"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ldm_jax.sample",
            f"--workdir={txt2img_workdir}",
            f"--prompts_file={prompts}",
            "--prompt=a small green triangle on the left on a gray background",
            "--num_per_prompt=2",
            "--num_steps=3",
            "--guidance_scale=4",
            "--seed=10",
            f"--outdir={outdir}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (outdir / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    assert [x["seed"] for x in lines] == list(range(10, 16))
    assert lines[0]["prompt"] == "a small green triangle on the left on a gray background"
    assert {x["guidance_scale"] for x in lines} == {4.0} and {x["num_steps"] for x in lines} == {3}
    for x in lines:
        assert Image.open(outdir / x["file"]).size == (16, 16)
    assert Image.open(outdir / "grid.png").size[0] > 16
    assert not [f for f in os.listdir(outdir) if f.endswith(".tmp")]


def test_sample_cli_rejects_a_non_txt2img_workdir(first_stage_workdir):
    proc = subprocess.run(
        [sys.executable, "-m", "ldm_jax.sample", f"--workdir={first_stage_workdir}", "--prompt=x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "sampling needs a txt2img run" in proc.stderr
