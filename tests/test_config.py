import os
import re

import numpy as np
import pytest
from cli import run_module

from configs import autoencoder_kl, autoencoder_vq, class_cond, inpainting, superres, txt2img, unconditional
from ldm_jax.tasks import validate_config
from ldm_jax.training.sharding import check_batch_size, make_mesh


@pytest.mark.parametrize(
    "module", [autoencoder_kl, autoencoder_vq, txt2img, class_cond, unconditional, inpainting, superres]
)
def test_every_preset_validates(module, tmp_path):
    vgg = tmp_path / "vgg16.safetensors"  # the zoo presets need a user-supplied VGG16 file for LPIPS
    vgg.write_bytes(b"")
    for p in module.PRESETS:
        c = module.get_config(p)
        if c.data.source == "required":  # pod presets train on the user's data and say so
            with pytest.raises(ValueError, match="data.source='required': this preset trains on your data"):
                validate_config(c)
            c.data.source = f"folder:{tmp_path}"
        if c.task != "autoencoder" and not c.first_stage.workdir:
            c.first_stage.workdir = "somewhere"
        if c.task == "autoencoder" and c.loss.perceptual_weight > 0 and not c.loss.lpips_vgg_weights:
            c.loss.lpips_vgg_weights = str(vgg)
        validate_config(c)


def test_pod_scale_txt2img_describes_the_paper_setup():
    c = txt2img.get_config()
    assert c.data.image_size == 256 and tuple(c.unet.block_out_channels) == (320, 640, 1280, 1280)
    assert c.text_encoder.width == 768 and c.text_encoder.max_length == 77


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("optim.lr", -1.0, "optim.lr=-1.0"),
        ("diffusion.prediction_type", "noise", "diffusion.prediction_type='noise'"),
        ("unet.num_heads", (3, 4), "unet.num_heads"),
        ("data.global_batch_size", 0, "data.global_batch_size=0"),
        ("sample.num_steps", 5000, "sample.num_steps=5000"),
        ("first_stage.workdir", "", "first_stage.workdir"),
        ("sample.sampler", "heun", "sample.sampler='heun': must be one of"),
        ("sample.guidance_rescale", 1.5, "sample.guidance_rescale=1.5"),
        ("diffusion.loss_weighting", "p2", "diffusion.loss_weighting='p2'"),
        ("diffusion.rescale_betas_zero_snr", True, "needs prediction_type 'v_prediction' or 'sample'"),
        ("data.name", "photo_crops", "data.name='photo_crops': has images only"),
        ("eval.every", -1, "eval.every=-1: must be >= 0"),
        ("data.prefetch_buffer_size", 0, "data.prefetch_buffer_size=0: must be >= 1"),
        ("data.read_threads", 0, "data.read_threads=0: must be >= 1"),
        # Found inside validate by a ZeroDivisionError, or not at all (no cross-attention, no ResNet blocks).
        ("unet.norm_groups", 0, "unet.norm_groups=0: must be >= 1"),
        ("unet.block_out_channels", (0, 32), "unet.block_out_channels=(0, 32): every entry must be >= 1"),
        ("unet.transformer_depth", 0, "unet.transformer_depth=0: must be >= 1"),
        ("unet.layers_per_block", 0, "unet.layers_per_block=0: must be >= 1"),
        ("unet.head_dim", -4, "unet.head_dim=-4: must be >= 0"),
        ("text_encoder.heads", 0, "text_encoder.heads=0: must be >= 1"),
        ("text_encoder.output_layer", -2, "text_encoder.output_layer=-2: -2 (the penultimate layer) needs"),
        ("data.shuffle_seed", -1, "data.shuffle_seed=-1: must be >= 0"),
        # The embedded dataset's sizes: found now, not after the train state is built.
        ("data.image_size", 32, "data.image_size=32: the embedded shapes_captions config 'tiny' has 16x16 images"),
        ("data.global_batch_size", 512, "data.global_batch_size=512: larger than the embedded shapes_captions"),
        ("text_encoder.vocab_size", 1000, "text_encoder.vocab_size=1000: must be >= 49408"),
        ("unet.attention_levels", ("false,true",), "unet.attention_levels=('false,true',): entries must be True or"),
        ("optim.b2", 1.0, "optim.b2=1.0: must be in"),
        ("optim.weight_decay", -0.1, "optim.weight_decay=-0.1: must be >= 0"),
        ("diffusion.beta_end", 1.5, "diffusion.beta_end=1.5: must be < 1"),
        ("diffusion.beta_start", 0.5, "diffusion.beta_start=0.5: must be in (0, diffusion.beta_end=0.012]"),
        ("train.keep_every", 6, "train.keep_every=6: must be a multiple of train.checkpoint_every=4"),
        # Leading spacing with steps_offset=1 reaches t=1000 at 1000 steps: an IndexError at the first preview.
        ("sample.num_steps", 1000, "sample.num_steps=1000: with sample.spacing='leading' and sample.steps_offset=1"),
    ],
)
def test_validate_names_the_bad_field(field, value, match):
    c = txt2img.get_config("tiny")
    c.first_stage.workdir = "x"
    section, key = field.split(".")
    c[section][key] = value
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        validate_config(c)


def test_min_snr_weighting_is_refused_at_zero_terminal_snr():
    """Min-SNR's weight vanishes at the zero-SNR steps (the top of a rescaled schedule), which would go untrained;
    the pair is refused by name, while each half validates alone."""
    from ldm_jax.diffusion.objectives import loss_weights
    from ldm_jax.diffusion.schedules import make_schedule

    top = np.asarray([999])
    assert float(loss_weights("min_snr", "v_prediction", make_schedule(rescale_betas_zero_snr=True), top)[0]) == 0.0
    assert float(loss_weights("min_snr", "v_prediction", make_schedule(), top)[0]) > 0.0
    c = txt2img.get_config("tiny")
    c.first_stage.workdir = "x"
    c.diffusion.update(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    validate_config(c)
    c.diffusion.update(rescale_betas_zero_snr=False, loss_weighting="min_snr")
    validate_config(c)
    c.diffusion.rescale_betas_zero_snr = True
    with pytest.raises(ValueError, match="diffusion.loss_weighting='min_snr': cannot be 'min_snr' with rescale_betas"):
        validate_config(c)
    # The plus-one form keeps the zero-SNR steps' weight (1) and is allowed there; with epsilon it is refused.
    c.diffusion.loss_weighting = "min_snr_plus_one"
    validate_config(c)
    c.diffusion.update(rescale_betas_zero_snr=False, prediction_type="epsilon")
    with pytest.raises(ValueError, match="loss_weighting='min_snr_plus_one': cannot be 'min_snr_plus_one' with"):
        validate_config(c)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"metrics": "fid,psnr"}, "eval.metrics='fid,psnr': must be a comma-separated choice of"),
        ({"metrics": "fid"}, "eval.fid_weights='': FID, KID and IS need the FID Inception weights"),
        ({"metrics": "clip_score"}, "eval.clip_weights='': clip_score needs CLIP weights"),
        ({"metrics": "kid", "fid_weights": "w.pth", "num_samples": 1}, "eval.num_samples=1: must be >= 2"),
        # Paths are read at the first evaluation, thousands of steps in: named at start-up instead.
        (
            {"metrics": "fid", "fid_weights": "/nonexistent/w.pth"},
            "eval.fid_weights='/nonexistent/w.pth': no such file",
        ),
        (
            {"metrics": "clip_score", "clip_weights": "/nonexistent/clip"},
            "eval.clip_weights='/nonexistent/clip': no such",
        ),
        (
            {"metrics": "fid", "fid_weights": __file__, "prompts_file": "/nonexistent/p.txt"},
            "eval.prompts_file='/nonexistent/p.txt': no such file",
        ),
        (
            {"metrics": "kid", "fid_weights": __file__, "num_samples": 8, "kid_subset_size": 9},
            "eval.kid_subset_size=9: must be 0 (automatic) or in [2, eval.num_samples=8]",
        ),
    ],
)
def test_eval_section_names_the_bad_field(overrides, match):
    c = txt2img.get_config("tiny")
    c.first_stage.workdir = "x"
    c.eval.update(every=10, **overrides)
    with pytest.raises(ValueError, match=re.escape(match)):
        validate_config(c)


def test_seeds_and_prompt_metrics_are_checked_before_any_device_work():
    """Each failed late: a negative seed at the first preview (uint32 keys), clip_score or a prompts file on a run
    without prompts at the first evaluation, eval.every steps in; an autoencoder's norm_groups=0 inside validate."""
    from configs import autoencoder_kl

    c = txt2img.get_config("tiny")
    c.first_stage.workdir = "x"
    c.seed = -1
    with pytest.raises(ValueError, match=re.escape("seed=-1: must be in [0, 2**31)")):
        validate_config(c)
    c.seed = 0
    c.eval.update(every=10, metrics="fid", fid_weights=__file__, seed=2**32 - 8, num_samples=16)
    with pytest.raises(ValueError, match=re.escape(f"eval.seed={2**32 - 8}: sample i uses seed + i as a uint32 key")):
        validate_config(c)
    c = class_cond.get_config("tiny")
    c.first_stage.workdir = "x"
    c.eval.update(every=10, metrics="fid,clip_score", fid_weights=__file__, clip_weights=__file__)
    with pytest.raises(
        ValueError, match="eval.metrics='fid,clip_score': clip_score scores images against their prompts"
    ):
        validate_config(c)
    c.eval.update(metrics="fid", prompts_file=__file__)
    with pytest.raises(ValueError, match="eval.prompts_file=.*: a class_cond run takes no prompts"):
        validate_config(c)
    ae = autoencoder_kl.get_config("tiny")
    ae.model.norm_groups = 0
    with pytest.raises(ValueError, match="model.norm_groups=0: must be >= 1"):
        validate_config(ae)


def test_eval_during_training_is_refused_for_runs_that_need_inputs_beyond_conditions():
    from configs import superres

    c = superres.get_config("tiny")
    c.first_stage.workdir = "x"
    c.eval.update(every=10, metrics="fid", fid_weights=__file__)
    with pytest.raises(ValueError, match="eval.every=10: distribution metrics during training need a txt2img"):
        validate_config(c)


def test_unknown_preset_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="'huge'.*demo"):
        txt2img.get_config("huge")


def test_batch_not_divisible_by_devices_is_a_clear_error():
    mesh = make_mesh(-1, 1)
    assert mesh.size == 8
    with pytest.raises(ValueError, match="data.global_batch_size=12: must be divisible by the device count 8"):
        check_batch_size(12, mesh)
    with pytest.raises(ValueError, match="mesh.fsdp=3"):
        make_mesh(-1, 3)


def _run_train(*args):
    return run_module("ldm_jax.train", *args, timeout=300)


def test_cli_rejects_unknown_and_invalid_fields_before_device_work(tmp_path):
    workdir = str(tmp_path / "w")
    unknown = _run_train(
        "--config=configs/autoencoder_kl.py:tiny", "--config.optim.learning_rate=1", f"--workdir={workdir}"
    )
    assert unknown.returncode != 0 and "learning_rate" in unknown.stderr
    bad = _run_train("--config=configs/autoencoder_kl.py:tiny", "--config.optim.ema_decay=1.5", f"--workdir={workdir}")
    assert bad.returncode != 0 and "optim.ema_decay=1.5: must be in [0, 1)" in bad.stderr
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("classes", "size_color", "classes='size_color': must be one of"),
        ("sample.class_labels", (0, 18), r"must be integers in \[0, 18\)"),
        ("sample.class_labels", (1.5, 2), r"sample.class_labels=\(1.5, 2\): must be integers in \[0, 18\)"),
        ("class_conditioning", "concat", "class_conditioning='concat': must be one of"),
        ("class_context_dim", 0, "class_context_dim=0: must be >= 1 with class_conditioning='cross_attention'"),
        (
            "unet.attention_levels",
            (False, False, False),
            r"unet.attention_levels=\(False, False, False\): needs at least one level",
        ),
    ],
)
def test_class_cond_config_names_the_bad_field(field, value, match):
    c = class_cond.get_config("demo")
    if field != "class_conditioning":
        c.class_conditioning = "cross_attention"  # the rules of the class token hold with it
    section, _, name = field.rpartition(".")
    (c[section] if section else c)[name] = value
    with pytest.raises(ValueError, match=match):
        validate_config(c)


def test_inpainting_demo_fine_tunes_the_txt2img_demo():
    """The inpainting demo starts from the txt2img demo's weights (init_from), so it must describe the same model on
    the same first stage; only the task and the training length differ."""
    inp, t2i = inpainting.get_config("demo"), txt2img.get_config("demo")
    assert inp.task == "inpainting" and inp.init_from == "runs/demo/txt2img"
    for section in ("unet", "text_encoder", "diffusion", "first_stage", "data", "sample"):
        assert inp[section].to_dict() == t2i[section].to_dict(), section
    assert inp.train.num_steps < t2i.train.num_steps
