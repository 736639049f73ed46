"""Fine-tuning imported Stable Diffusion checkpoints: DreamBooth with prior preservation and LoRA (train, export to
the diffusers/PEFT layout, kohya files, merge), checked against diffusers' ``load_lora_weights`` on a tiny
random-weight pipeline that the reference environment builds."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from own_data import write_subject_folder
from reference_env import ROOT

# The same tiny pipeline as the interop tests' (one block per level: short compiles).
from test_interop import CLIP, SCHEDULER, UNET_PIPE, VAE, run_oracle

from ldm_jax.interop.state_dict import flatten

CLASS_IMAGES = 4


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny random-weight StableDiffusionPipeline saved by diffusers, and its ldm_jax conversion."""
    d = tmp_path_factory.mktemp("lora_sd")
    from ldm_jax.data.tokenizer import CLIPTokenizer

    CLIPTokenizer(16, "eot").save_hf_files(str(d / "tokenizer"))
    np.savez(d / "pipe_in.npz", x_T=np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32))
    job = dict(
        name="pipeline", kind="pipeline", seed=40, inputs=str(d / "pipe_in.npz"), dir=str(d / "pipeline"),
        outputs=str(d / "pipe_out.npz"), tokenizer_dir=str(d / "tokenizer"), prompts=["a photo of a dog"],
        num_steps=2, guidance_scale=5.0, config=dict(unet=UNET_PIPE, vae=VAE, text_encoder=CLIP, scheduler=SCHEDULER),
    )  # fmt: skip
    run_oracle([job], str(d))
    out = str(d / "converted")
    proc = subprocess.run(
        [sys.executable, "-m", "ldm_jax.convert", f"--src={d / 'pipeline'}", f"--out={out}"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(folder=str(d), pipeline=str(d / "pipeline"), converted=out)


def _dreambooth_config(sd, root, num_steps):
    from configs import dreambooth

    c = dreambooth.get_config("tiny")
    c.init_from = sd["converted"]
    c.dreambooth.update(
        instance_dir=os.path.join(root, "instance"), instance_prompt="a photo of sks dog",
        class_dir=os.path.join(root, "class"), class_prompt="a photo of a dog", num_class_images=CLASS_IMAGES,
    )  # fmt: skip
    c.lora.update(rank=4, alpha=8.0, targets=("unet_attention", "text_attention"))
    c.train.num_steps = num_steps
    return c


@pytest.fixture(scope="module")
def run(sd):
    """DreamBooth with LoRA (UNet and text encoder attention) from the converted pipeline: class images drawn by it,
    then 12 steps."""
    from ldm_jax.training.loop import train_and_evaluate

    root = os.path.join(sd["folder"], "dreambooth")
    write_subject_folder(os.path.join(root, "instance"))
    workdir = os.path.join(root, "run")
    state = train_and_evaluate(_dreambooth_config(sd, root, 12), workdir)
    return dict(root=root, workdir=workdir, state=state)


def test_dreambooth_lora_trains_adapters_only_and_the_loss_falls(sd, run):
    from ldm_jax import config_lib
    from ldm_jax.data.pipeline import to_model_range
    from ldm_jax.tasks import build_task
    from ldm_jax.training.checkpoint import load_trained_params

    state = run["state"]
    # Only adapters are trained and in the optimizer state: every array leaf is an adapter's shape (or a counter).
    leaves = flatten(jax.device_get(state.params))
    assert leaves and all(p[-1] in ("lora_a", "lora_b") for p in leaves)
    assert sorted({p[0] for p in leaves}) == ["text", "unet"]
    shapes = {tuple(v.shape) for v in leaves.values()}
    assert all(x.ndim == 0 or tuple(x.shape) in shapes for x in jax.tree.leaves(state.opt_state))
    base, _, _ = load_trained_params(sd["converted"], "params")
    n_base = sum(x.size for x in jax.tree.leaves(base))
    assert sum(v.size for v in leaves.values()) < n_base / 10

    # The class images were drawn once by the base model.
    class_dir = os.path.join(run["root"], "class")
    assert sorted(os.listdir(class_dir)) == [f"class_{i:05d}.png" for i in range(CLASS_IMAGES)]

    # The DreamBooth loss (instance + prior) on a fixed batch and randomness: lower with the trained adapters than
    # at step 0 (B = 0: exactly the base model).
    cfg = config_lib.load_config(os.path.join(run["workdir"], "config.json"))
    task = build_task(cfg)
    trained, meta, step = load_trained_params(run["workdir"], "params")
    assert step == 12 and meta["lora_base"]["workdir"] == os.path.abspath(sd["converted"])
    frozen, _ = task.setup(meta)
    # The base is recorded by its weights: a resume whose init_from holds others (same step, e.g. another
    # converted checkpoint, or a base trained on under the same path) is refused, not adapted further.
    other = dict(meta, lora_base=dict(meta["lora_base"], fingerprint="0" * 64))
    with pytest.raises(ValueError, match=r"holds other weights than the base this run's adapters were trained on"):
        task.setup(other)
    local = next(iter(task.train_loader(0)))
    batch = {k: jnp.asarray(v) for k, v in local.items() if not k.startswith("_")}
    for k in ("image", "prior_image"):
        batch[k] = jnp.asarray(to_model_range(local[k]))
    loss = jax.jit(lambda p, r: task.loss_fn(p, frozen, batch, r)[0])
    start = task.init_params(jax.random.key(0))
    for seed in range(3):
        r = jax.random.key(100 + seed)
        before, after = float(loss(start, r)), float(loss(trained, r))
        assert after < before, (seed, before, after)


def test_dreambooth_resume_keeps_the_class_images(sd, run):
    """A rerun with more steps resumes the LoRA run and draws no class image again."""
    from ldm_jax.training.checkpoint import load_trained_params
    from ldm_jax.training.loop import train_and_evaluate

    class_dir = os.path.join(run["root"], "class")
    stamps = {n: os.stat(os.path.join(class_dir, n)).st_mtime_ns for n in os.listdir(class_dir)}
    train_and_evaluate(_dreambooth_config(sd, run["root"], 14), run["workdir"])
    assert {n: os.stat(os.path.join(class_dir, n)).st_mtime_ns for n in os.listdir(class_dir)} == stamps
    _, _, step = load_trained_params(run["workdir"], "params")
    assert step == 14


def _kohya(peft: dict, alpha: float) -> dict:
    """The same adapters in kohya's naming, with an alpha other than the rank (B rescaled to compensate)."""
    out = {}
    for key, value in peft.items():
        component, _, rest = key.partition(".")
        module, _, part = rest.rpartition(".lora_")
        name = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component] + module.replace(".", "_")
        rank = value.shape[0] if part == "A.weight" else value.shape[1]
        if part == "A.weight":
            out[f"{name}.lora_down.weight"] = value
            out[f"{name}.alpha"] = np.asarray(alpha, np.float32)
        else:
            out[f"{name}.lora_up.weight"] = value * (rank / alpha)
    return out


def test_exported_adapters_match_diffusers_load_lora_weights(sd, run, tmp_path):
    """Our LoRA export loaded by diffusers (unmerged), a kohya-named copy of it, and the merged pipeline export all
    give our adapted UNet's and text encoder's outputs."""
    from safetensors.numpy import load_file, save_file

    from ldm_jax.interop import stable_diffusion
    from ldm_jax.models import lora
    from ldm_jax.tasks import load_for_sampling

    peft_file = str(tmp_path / "dog.safetensors")
    proc = subprocess.run(
        [sys.executable, "-m", "ldm_jax.export", f"--workdir={run['workdir']}", "--lora_only", f"--out={peft_file}"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    peft = load_file(peft_file)
    assert info["modules"] == len(peft) // 2 > 0
    assert all(k.startswith(("unet.", "text_encoder.")) for k in peft)
    kohya_file = str(tmp_path / "dog_kohya.safetensors")
    save_file(_kohya(peft, alpha=2.0), kohya_file)
    merged_dir = str(tmp_path / "merged")
    stable_diffusion.export_workdir(run["workdir"], merged_dir)

    rng = np.random.default_rng(1)
    ids = np.full((2, 16), 49407, np.int64)
    ids[:, 0] = 49406
    ids[:, 1:6] = rng.integers(0, 49406, (2, 5))
    inputs = dict(
        ids=ids,
        z=rng.standard_normal((2, 8, 8, 4)).astype(np.float32),
        t=np.array([10, 700], np.int64),
    )
    np.savez(tmp_path / "in.npz", **inputs)
    job = dict(
        name="lora", kind="lora", dir=sd["pipeline"], inputs=str(tmp_path / "in.npz"), outputs=str(tmp_path / "o.npz"),
        files=dict(peft=peft_file, kohya=kohya_file), folders=dict(merged=merged_dir),
    )  # fmt: skip
    ref = run_oracle([job], str(tmp_path))["lora"]

    task, params, frozen, _, _ = load_for_sampling(run["workdir"])
    context = task.conditioner.text_encoder.apply({"params": frozen["text"]}, jnp.asarray(ids, jnp.int32))
    out = task.unet.apply({"params": params["unet"]}, jnp.asarray(inputs["z"]), jnp.asarray(inputs["t"]), context)

    def err(a, b):
        return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

    # The adapters change the model well beyond the tolerances.
    assert err(ref["base_unet"], ref["peft_unet"]) > 1e-2 and err(ref["base_context"], ref["peft_context"]) > 1e-2
    assert err(context, ref["peft_context"]) < 1e-4 and err(out, ref["peft_unet"]) < 1e-4
    for name in ("kohya", "merged"):
        assert err(ref[f"{name}_context"], ref["peft_context"]) < 1e-5, name
        assert err(ref[f"{name}_unet"], ref["peft_unet"]) < 1e-5, name

    # Our reader gives the same adapters from both namings.
    abstract = {"unet": params["unet"], "text": frozen["text"]}
    a, naming_a = lora.adapters_from_state_dict(peft, abstract, "peft")
    b, naming_b = lora.adapters_from_state_dict(load_file(kohya_file), abstract, "kohya")
    assert (naming_a, naming_b) == ("diffusers/PEFT", "kohya")
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    # A products (the update each module gets) agree; B alone is rescaled by alpha.
    for path in fa:
        if path[-1] == "lora_a":
            bpath = path[:-1] + ("lora_b",)
            np.testing.assert_allclose(fa[path] @ fa[bpath], fb[path] @ fb[bpath], atol=1e-6)


def test_lora_file_at_any_scale_reuses_the_compiled_sampler(sd, run, tmp_path):
    from compile_count import count_generate_traces

    from ldm_jax.interop import stable_diffusion
    from ldm_jax.tasks import load_for_sampling
    from ldm_jax.tasks.adapters import apply_files

    f = str(tmp_path / "dog.safetensors")
    stable_diffusion.export_lora(run["workdir"], f)
    task, params, frozen, mesh, _ = load_for_sampling(sd["converted"])
    traces = count_generate_traces(task)
    options = task.sampler_options(num_steps=2)
    images = {}
    for scale in (0.0, 0.5, 1.5):
        p, fz, applied = apply_files(params, frozen, [(f, scale)])
        assert applied[0]["modules"]["unet"] > 0 and applied[0]["modules"]["text"] > 0
        images[scale] = task.generate_images(p, fz, mesh, ["a photo of sks dog"] * 8, list(range(8)), options, 3.0)
    assert len(traces) == 1  # three scales, one compiled program
    base = task.generate_images(params, frozen, mesh, ["a photo of sks dog"] * 8, list(range(8)), options, 3.0)
    np.testing.assert_array_equal(images[0.0], base)  # scale 0 is the base model
    assert not np.array_equal(images[0.5], images[1.5])


def test_lora_errors_name_the_field_or_key(sd, run, tmp_path):
    from safetensors.numpy import save_file

    from ldm_jax.interop import stable_diffusion
    from ldm_jax.models import lora
    from ldm_jax.tasks import load_for_sampling, validate_config
    from ldm_jax.tasks.adapters import apply_files

    from ldm_jax.tasks import dreambooth

    c = _dreambooth_config(sd, run["root"], 1)
    dreambooth.resolve(c)  # the model sections of the converted pipeline
    validate_config(c)
    c.init_from = ""
    with pytest.raises(ValueError, match="init_from='': lora.rank=4: adapters train on the weights"):
        validate_config(c)
    c.init_from = sd["converted"]
    c.text_encoder.trainable = True
    with pytest.raises(ValueError, match="text_encoder.trainable=True: must be False in a LoRA run"):
        validate_config(c)
    c.text_encoder.trainable = False
    c.lora.targets = ("unet_attention", "conv")
    with pytest.raises(ValueError, match=r"lora.targets=.*'conv' is not one of"):
        validate_config(c)
    c.lora.targets = ("unet_attention", "text_attention")
    c.dreambooth.class_dir = "gs://bucket/class"  # would be drawn and uploaded before the folder reader refused it
    with pytest.raises(ValueError, match=r"dreambooth.class_dir='gs://bucket/class': must be a local or mounted"):
        validate_config(c)
    # A folder of photos the reader cannot take (e.g. a phone's HEIC): named before any class image is drawn.
    heic, c.dreambooth.class_dir = tmp_path / "heic", str(tmp_path / "class")
    heic.mkdir()
    (heic / "IMG_0001.HEIC").write_bytes(b"not read")
    c.dreambooth.instance_dir = str(heic)
    with pytest.raises(ValueError, match=r"dreambooth.instance_dir='.*heic': holds no image file \(.jpg"):
        validate_config(c)

    task, params, frozen, _, _ = load_for_sampling(sd["converted"])
    bad = str(tmp_path / "bad.safetensors")
    save_file({"unet.down_blocks.9.attentions.0.proj.lora_A.weight": np.zeros((4, 32), np.float32),
               "unet.down_blocks.9.attentions.0.proj.lora_B.weight": np.zeros((32, 4), np.float32)}, bad)  # fmt: skip
    with pytest.raises(lora.AdapterFileError, match=r"not in this model: unet.down_blocks.9"):
        apply_files(params, frozen, [(bad, 1.0)])
    save_file({"unet.some.hada_w1_a": np.zeros((4, 32), np.float32)}, bad)
    with pytest.raises(lora.AdapterFileError, match="LoCon/LoHa/DoRA"):
        apply_files(params, frozen, [(bad, 1.0)])
    # A community .bin LoRA is a pickle: read on request only (sample --allow_pickle), with torch.
    pickled = str(tmp_path / "pytorch_lora_weights.bin")
    with open(pickled, "wb") as f:
        f.write(b"\x80\x02}q\x00.")
    with pytest.raises(PermissionError, match=r"pytorch_lora_weights.bin: a pickled .*--allow_pickle"):
        apply_files(params, frozen, [(pickled, 1.0)])
    # The flag that message names, on the command line that reads LoRA files (imported here, ldm_jax.sample's
    # flags would clash with other CLIs' in this process).
    helped = subprocess.run([sys.executable, "-m", "ldm_jax.sample", "--helpshort"], capture_output=True, text=True)
    assert "--[no]allow_pickle" in helped.stdout + helped.stderr
    with pytest.raises(ValueError, match=r"pytorch_lora_weights.bin: .*(torch is not importable|torch.load)"):
        apply_files(params, frozen, [(pickled, 1.0)], allow_pickle=True)
    with pytest.raises(ValueError, match="not a LoRA run"):
        stable_diffusion.export_lora(sd["converted"], str(tmp_path / "x.safetensors"))
    assert lora.parse_lora_flag("a/b.safetensors:0.7") == ("a/b.safetensors", 0.7)
    assert lora.parse_lora_flag("c:/x.safetensors") == ("c:/x.safetensors", 1.0)


def test_lora_on_a_class_conditional_run(data_dir, first_stage_workdir, tmp_path):
    """LoRA is not text-to-image only: adapters on a class-conditional run's attention (its class token through
    cross-attention, as the ldm and demo presets: a trained table outside the UNet that the adapted model keeps);
    the adapted model differs from its base exactly in the adapted kernels, and samples."""
    from configs import class_cond

    from ldm_jax.tasks import load_for_sampling
    from ldm_jax.training.checkpoint import load_trained_params
    from ldm_jax.training.loop import train_and_evaluate

    def config(steps):
        c = class_cond.get_config("tiny")
        c.data.data_dir, c.first_stage.workdir = data_dir, first_stage_workdir
        c.class_conditioning = "cross_attention"
        c.train.update(num_steps=steps, checkpoint_every=steps)
        return c

    base_dir, lora_dir = str(tmp_path / "base"), str(tmp_path / "lora")
    # Past the warm-up (lr 0 at step 0): the transformers' zero-initialised proj_out must have moved, or no
    # gradient reaches the attention's adapters.
    train_and_evaluate(config(4), base_dir)
    c = config(2)
    c.init_from = base_dir
    c.lora.update(rank=2)
    c.optim.update(lr=1e-2, warmup_steps=0)
    state = train_and_evaluate(c, lora_dir)
    assert all(p[-1] in ("lora_a", "lora_b") for p in flatten(jax.device_get(state.params)))

    base, _, _ = load_trained_params(base_dir, "ema")
    task, params, frozen, mesh, _ = load_for_sampling(lora_dir)
    merged, original = flatten(jax.device_get(params["unet"])), flatten(jax.device_get(base["unet"]))
    assert merged.keys() == original.keys()
    changed = {p for p in merged if not np.array_equal(merged[p], original[p])}
    adapted = {p[1:-1] + ("kernel",) for p in flatten(jax.device_get(state.params)) if p[-1] == "lora_a"}
    assert changed and changed <= adapted  # B moved off zero: the adapted kernels changed, nothing else did
    np.testing.assert_array_equal(params["class_embedding"]["embedding"], base["class_embedding"]["embedding"])
    images = task.generate_images(params, frozen, mesh, [0, 1], [0, 1], task.sampler_options(num_steps=2), 2.0)
    assert images.shape == (2, 16, 16, 3)
