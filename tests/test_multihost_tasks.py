"""Every task trains on a mesh that spans processes: 2 processes x 2 CPU devices (jax.distributed over 127.0.0.1)
against 1 process x 4 devices, with previews and in-training evaluation on, and the two-process runs stopped at
step 2 and resumed from their checkpoint to step 4.

Covered: the KL autoencoder, the VQ autoencoder with its discriminator (switched on at step 2, after the resume,
which falls back past a damaged checkpoint on both processes),
txt2img, class_cond, unconditional, inpainting (from txt2img weights, with FSDP), superres (all on one shared tiny
first stage), DreamBooth with LoRA adapters (from the txt2img run), and fine-tuning a converted diffusers pipeline (``init_from`` the import, text encoder frozen). For
each: the same loss and metric trajectory (evaluation metrics included), the same final parameters (to the tolerance
``test_multihost`` documents), and the same preview images. All runs of one layout share one job
(``multihost_driver.py``), and the two layouts run at the same time, so the matrix costs three JAX start-ups. In the
two-process job, process 0 compiles each program and process 1 loads its executable
(``compile_sharing.py``): 100 s less CPU for the CI cases (627 vs 726 s, the file alone on 2 cores). A
process 1 that traced a different program than process 0 would wait for an executable that never comes, and fail
at the share timeout.
"""

import json
import os
import shutil
import sys
import time

import jax
import numpy as np
import pytest
from cli import ROOT, run_module, start, two_process_job, wait_all
from metric_weights import write_fid_inception
from own_data import write_subject_folder
from PIL import Image

from ldm_jax.training import checkpoint as ckpt_lib

DRIVER = os.path.join(ROOT, "tests", "multihost_driver.py")
COMMON = {
    "train.log_every": 1,
    "train.checkpoint_every": 2,
    "train.preview_every": 2,
    "data.global_batch_size": 8,
}
# The CI cases cover the paths that put data on the mesh: frozen weights (the first stage), init_from weights (with
# the inpainting model's widened input, FSDP-sharded), the adversarial step and in-training evaluation, previews from
# prompts and from per-image inputs (init image and mask), and a LoRA run's frozen base and the DreamBooth class images
# drawn over both processes. The slow cases repeat those paths with other conditioning,
# and fine-tuning an imported pipeline with its text encoder frozen (frozen weights from init_from; single-process in
# CI through tests/test_latent_cache.py): `pytest -m slow tests/test_multihost_tasks.py` runs them.
CI_CASES = ["ae_vq_gan", "txt2img", "inpainting", "dreambooth_lora"]
DAMAGED_CASE = "ae_vq_gan"  # its two-process run resumes past a damaged checkpoint
SLOW_CASES = ["ae_kl", "class_cond", "unconditional", "superres", "finetune_imported"]


@pytest.fixture(scope="module")
def converted_pipeline(txt2img_workdir, tmp_path_factory):
    """A diffusers StableDiffusionPipeline folder (exported from a tiny trained run, as PyTorch would load it),
    imported back by the converter: the starting point of a fine-tuning run."""
    from ldm_jax.interop import stable_diffusion

    d = tmp_path_factory.mktemp("pipeline")
    stable_diffusion.export_workdir(txt2img_workdir, str(d / "diffusers"))
    pipe = stable_diffusion.load_diffusers_folder(str(d / "diffusers"))
    stable_diffusion.write_workdirs(pipe, str(d / "converted"), str(d / "diffusers"))
    return str(d / "converted")


def _cases(names, root, data_dir, first_stage_workdir, txt2img_workdir=None, converted_pipeline=None):
    ldm = {"first_stage.workdir": first_stage_workdir}
    # Distribution metrics during training (KID of 4 samples against 4 validation images at step 4, after the
    # two-process run's resume: the FID Inception on every device of every process; FID's pooling over hosts is
    # tested in test_sampling_job), with random FID Inception weights the matrix writes. Every 4 steps, not 2: each
    # evaluation compiles the Inception network in its process (the two-process run, stopped at 2, still
    # evaluates there: a run evaluates at its last step).
    periodic_eval = {
        "eval.every": 4,
        "eval.num_samples": 4,
        "eval.metrics": "kid",
        "eval.fid_weights": os.path.join(os.path.dirname(root), "inception.npz"),
        "eval.per_device_batch": 1,
        "eval.kid_subsets": 5,
    }
    specs = {
        "ae_kl": ("autoencoder_kl:tiny", {"disc.enabled": False}),
        # Checkpoints at every step: the two-process run's newest one (2) is damaged before it resumes, so it falls
        # back to 1 (both processes agreeing) and must still end as the uninterrupted run does.
        "ae_vq_gan": ("autoencoder_vq:tiny", {"disc.start": 2, "train.checkpoint_every": 1}),
        "txt2img": ("txt2img:tiny", {**ldm, **periodic_eval}),
        # The class token of the ldm and demo presets (tiny's own is the timestep embedding, tests/test_class_cond.py).
        "class_cond": ("class_cond:tiny", {**ldm, "class_conditioning": "cross_attention"}),
        "unconditional": ("unconditional:tiny", ldm),
        "superres": ("superres:tiny", ldm),
    }
    if txt2img_workdir:
        # An inpainting model started from text-to-image weights (input widened at load), with FSDP: the token
        # embedding is split over a 2-device fsdp axis (inside each process), so init_from weights, the training
        # state and the EMA weights the previews sample with are placed leaf by leaf.
        specs["inpainting"] = ("inpainting:tiny", {**ldm, "init_from": txt2img_workdir, "mesh.fsdp": 2})
        # DreamBooth with LoRA from the text-to-image run: class images drawn by both processes' devices (process
        # 0 writes), then adapters trained on the frozen base (replicated on the mesh) and previews of the merge.
        specs["dreambooth_lora"] = (
            "dreambooth:tiny",
            {
                "init_from": txt2img_workdir,
                "dreambooth.instance_dir": os.path.join(os.path.dirname(root), "subject"),
                "dreambooth.instance_prompt": "a photo of sks square",
                "dreambooth.class_dir": os.path.join(root, "dreambooth_class"),
                "dreambooth.class_prompt": "a small red square in the center on a black background",
                "dreambooth.num_class_images": 4,
                "sample.num_steps": 4,
            },
        )
    if converted_pipeline:
        specs["finetune_imported"] = (
            os.path.join(converted_pipeline, "config.json"),
            {
                "init_from": converted_pipeline,
                "text_encoder.trainable": False,
                "data.config": "tiny",
                "optim.warmup_steps": 0,
                "sample.num_steps": 4,
            },
        )
    assert set(names) <= set(specs), (names, sorted(specs))
    return [
        {
            "name": name,
            "config": config,
            "set": {"data.data_dir": data_dir, **COMMON, **overrides},
            "workdir": os.path.join(root, name),
        }
        for name, (config, overrides) in specs.items()
        if name in names
    ]


def _run_matrix(names, root, *workdirs):
    """Runs the cases ``names`` as 2 processes x 2 devices (stopped at step 2 and resumed to 4) and as 1 process x
    4 devices (straight to 4), all at once; returns {layout: {case: workdir}}."""
    write_fid_inception(str(root / "inception.npz"))
    write_subject_folder(str(root / "subject"))
    layouts = {}
    for layout in ("two", "one"):
        cases = _cases(names, str(root / layout), *workdirs)
        for c in cases:
            c["stops"] = [2, 4] if layout == "two" else [4]
            if layout == "two" and c["name"] == DAMAGED_CASE:
                c["damage_before_stop"] = 4
        layouts[layout] = {"cases": cases, "timings": str(root / f"timings_{layout}.json")}
        with open(root / f"spec_{layout}.json", "w") as f:
            json.dump(layouts[layout], f)
    t0 = time.perf_counter()
    driver = [sys.executable, DRIVER]
    env = {"PYTHONPATH": ROOT}
    procs = two_process_job([*driver, f"--spec={root / 'spec_two.json'}"], str(root / "two"), env=env)
    procs.append(start([*driver, f"--spec={root / 'spec_one.json'}"], str(root / "one.log"), 4, env))
    outputs = wait_all(procs, timeout=1500)
    assert "(2 processes)" in outputs[0]
    timings = {}
    for layout, spec in layouts.items():
        with open(spec["timings"]) as f:
            timings[layout] = json.load(f)
    print(f"multi-host matrix: {time.perf_counter() - t0:.0f} s wall; per case (s): {timings}")
    return {layout: {c["name"]: c["workdir"] for c in spec["cases"]} for layout, spec in layouts.items()}


@pytest.fixture(scope="module")
def ci_matrix(tmp_path_factory, data_dir, first_stage_workdir, txt2img_workdir):
    root = tmp_path_factory.mktemp("multihost")
    return _run_matrix(CI_CASES, root, data_dir, first_stage_workdir, txt2img_workdir)


@pytest.fixture(scope="module")
def slow_matrix(tmp_path_factory, data_dir, first_stage_workdir, txt2img_workdir, converted_pipeline):
    root = tmp_path_factory.mktemp("multihost_slow")
    return _run_matrix(SLOW_CASES, root, data_dir, first_stage_workdir, txt2img_workdir, converted_pipeline)


def _metrics(workdir) -> dict:
    """{step: {name: value}} from metrics.jsonl, without the timing column; a resumed run's rows merge by step."""
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            row.pop("train/steps_per_sec", None)
            row.pop("eval/seconds", None)
            rows.setdefault(row.pop("step"), {}).update(row)
    return rows


def _previews(workdir, folder="previews") -> dict:
    """The PNGs of ``<workdir>/<folder>`` as int16 arrays by file name (other files as text)."""
    folder = os.path.join(workdir, folder)
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isdir(path):
            continue
        if name.endswith(".png"):
            out[name] = np.asarray(Image.open(path), np.int16)
        else:
            with open(path) as f:
                out[name] = f.read()
    return out


@pytest.mark.parametrize("case", CI_CASES)
def test_two_processes_train_like_one(ci_matrix, case):
    _check_same_training(ci_matrix["two"][case], ci_matrix["one"][case], case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES)
def test_two_processes_train_like_one_slow(slow_matrix, case):
    _check_same_training(slow_matrix["two"][case], slow_matrix["one"][case], case)


def _check_same_training(two: str, one: str, case: str) -> None:
    m2, m1 = _metrics(two), _metrics(one)
    assert sorted(m2) == sorted(m1) == [1, 2, 3, 4]
    if case == DAMAGED_CASE:
        # Both processes fell back from the damaged step 2 to step 1 (reported in the metrics, at the step resumed
        # from) and kept the damaged checkpoint aside; steps 2-4 were trained again (their rows replaced).
        fallback = {k: m2[1].pop(k) for k in list(m2[1]) if k.startswith("checkpoint/")}
        assert fallback["checkpoint/fallback_from_step"] == 2 and fallback["checkpoint/corrupt_moved_aside"] == 1
        assert [n for n in os.listdir(os.path.join(two, "checkpoints")) if n.startswith("2.corrupt-")]
    if case == "txt2img":
        # eval.every=4: the uninterrupted run evaluates at step 4 only; the two-process run also at step 2, where
        # its first invocation ends (a run evaluates at its last step too), with nothing to compare it with.
        assert "eval/kid_mean" in m2[2] and "eval/kid_mean" not in m1[2]
        m2[2] = {k: v for k, v in m2[2].items() if not k.startswith("eval/")}
    for step in m1:
        assert sorted(m2[step]) == sorted(m1[step]), step
        for name, value in m1[step].items():
            # Evaluation metrics are computed from uint8 images: a pixel that rounds the other way moves them by
            # ~1e-5 absolute (SSIM near 0 early in training makes that a large relative change).
            tol = dict(rtol=1e-4, atol=1e-4) if name.startswith("eval/") else dict(rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(m2[step][name], value, **tol, err_msg=f"{name} at step {step}")
    if case.startswith("ae_"):  # in-training evaluation on the validation images
        assert {"eval/psnr", "eval/l1"} <= set(m1[2]) and {"eval/psnr", "eval/l1"} <= set(m1[4])
    if case == "txt2img":  # distribution metrics of samples during training
        assert "eval/kid_mean" in m1[4] and "eval/kid_mean" in m2[4]

    # The resumed two-process run and the uninterrupted one end with the same parameters.
    p2, _, s2 = ckpt_lib.load_trained_params(two, "params")
    p1, _, s1 = ckpt_lib.load_trained_params(one, "params")
    assert s2 == s1 == 4
    compared = 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p2), jax.tree.leaves(p1), strict=True):
        name = jax.tree_util.keystr(path)
        if "to_k" in name and "bias" in name:
            continue  # zero gradient in exact arithmetic: Adam amplifies rounding noise (see test_multihost)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=name)
        compared += 1
    assert compared > 20

    if case == "dreambooth_lora":  # the class images, drawn by 2 processes and by 1, written once
        c2, c1 = _previews(two, "../dreambooth_class"), _previews(one, "../dreambooth_class")
        assert sorted(c2) == sorted(c1) == [f"class_{i:05d}.png" for i in range(4)]
        for name in c1:
            assert np.abs(c2[name] - c1[name]).max() <= 1, name
        assert all(str(p[-1]) in ("['lora_a']", "['lora_b']") for p, _ in jax.tree_util.tree_leaves_with_path(p1))

    # Previews at steps 2 (the end of the first job) and 4, written once (by process 0), showing the same images.
    v2, v1 = _previews(two), _previews(one)
    assert sorted(v2) == sorted(v1) and len(v1) == 2, (sorted(v2), sorted(v1))
    for name in v1:
        assert v2[name].shape == v1[name].shape
        # Weights equal to ~1e-6 can round a pixel to the next uint8 level, no more.
        assert np.abs(v2[name] - v1[name]).max() <= 1, name


def test_sampling_and_evaluation_jobs_run_on_two_processes(ci_matrix, tmp_path):
    """``ldm_jax.sample`` (txt2img, bfloat16) and ``ldm_jax.evaluate`` (the VQ autoencoder; the txt2img model's
    condition binding) as 2 processes x 2 devices: process 0 writes the same images and scores as one process."""
    txt2img, autoencoder = ci_matrix["two"]["txt2img"], ci_matrix["two"]["ae_vq_gan"]
    sample_args = ["--prompt=a large red circle in the center on a black background", "--prompt=a photo of a cat"]
    sample_args += [f"--workdir={txt2img}", "--num_per_prompt=3", "--num_steps=4", "--per_device_batch=1"]
    # In bfloat16: the weights are cast on the mesh that spans both processes (float32 two-process sampling is
    # test_sampling_job's).
    sample_args += ["--dtype=bfloat16"]
    eval_args = [f"--workdir={autoencoder}", "--split=validation", "--num_examples=20"]
    # The txt2img model's attribute scores and condition binding (its rows split over both processes' devices),
    # in a copy of the workdir: evaluation writes its results there.
    t2i_copy = str(tmp_path / "t2i")
    shutil.copytree(txt2img, t2i_copy)
    t2i_args = [f"--workdir={t2i_copy}", "--split=validation", "--num_examples=6", "--num_steps=2", "--batch_size=4"]
    module = [sys.executable, "-m"]
    jobs = two_process_job(
        [*module, "ldm_jax.sample", *sample_args, f"--outdir={tmp_path / 'two'}"], str(tmp_path / "s")
    )
    jobs += two_process_job([*module, "ldm_jax.evaluate", *eval_args], str(tmp_path / "e"))
    jobs += two_process_job([*module, "ldm_jax.evaluate", *t2i_args], str(tmp_path / "t"))
    wait_all(jobs, timeout=600)
    with open(os.path.join(autoencoder, "eval_validation.json")) as f:
        two_eval = json.load(f)
    with open(os.path.join(t2i_copy, "eval_validation.json")) as f:
        two_binding = json.load(f)["condition_binding"]

    one = run_module("ldm_jax.sample", *sample_args, f"--outdir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    two_images, one_images = _previews(str(tmp_path), "two"), _previews(str(tmp_path), "one")
    images = sorted(n for n in one_images if n.endswith(".png"))
    assert images == sorted(n for n in two_images if n.endswith(".png")) and len(images) == 6 + 1  # 6 images, grid
    for name in images:
        # 4 devices in 2 processes and 8 in one: with one image per device, each device runs the same program.
        np.testing.assert_array_equal(two_images[name], one_images[name], err_msg=name)
    assert two_images["manifest.jsonl"] == one_images["manifest.jsonl"]

    one = run_module("ldm_jax.evaluate", *eval_args)
    assert one.returncode == 0, one.stderr[-3000:]
    with open(os.path.join(autoencoder, "eval_validation.json")) as f:
        one_eval = json.load(f)
    assert two_eval["num_examples"] == one_eval["num_examples"] == 20
    one = run_module("ldm_jax.evaluate", *t2i_args)
    assert one.returncode == 0, one.stderr[-3000:]
    with open(os.path.join(t2i_copy, "eval_validation.json")) as f:
        one_binding = json.load(f)["condition_binding"]
    assert set(one_binding["increase"]) == {"color", "position", "size", "shape", "background"}
    for part in ("loss", "increase", "shape_pairs"):
        np.testing.assert_allclose(
            np.asarray(jax.tree.leaves(two_binding[part])), np.asarray(jax.tree.leaves(one_binding[part])), atol=1e-4
        )
    for name, value in one_eval["autoencoder"].items():
        np.testing.assert_allclose(two_eval["autoencoder"][name], value, rtol=1e-4, atol=1e-4, err_msg=name)
