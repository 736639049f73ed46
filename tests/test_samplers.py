"""Every sampler against the diffusers scheduler it mirrors, step for step (PyTorch reference environment)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_env import ROOT, run_reference

from configs import superres
from ldm_jax.diffusion import samplers
from ldm_jax.diffusion.schedules import make_schedule
from ldm_jax.interop.diffusers_config import scheduler_to_diffusers

REL_TOL = 1e-5  # max |ours - reference| / max |reference|, per step
# Zero-terminal-SNR Euler starts at sigma = 4096: its first update cancels terms ~200x larger than the result, so a
# one-ulp difference in sigma_max (torch's pow(x, 0.5) vs a correctly rounded sqrt) shows as ~3e-5 in float32.
ILL_CONDITIONED_TOL = 1e-4
NUM_STEPS = 10
SHAPE = (2, 4, 4, 3)
SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
PREDICTIONS = ("epsilon", "v_prediction", "sample")


_SUPERRES = superres.get_config().superres
SCHEDULES = {
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "scaled_linear_zero_snr": dict(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True
    ),
    "cosine_zero_snr": dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True),
    # configs/superres.py's noise augmentation of the low-resolution input (SD x4 upscaler's low_res_scheduler).
    "superres_noise_augmentation": dict(
        beta_schedule=_SUPERRES.noise_schedule, beta_start=_SUPERRES.noise_beta_start, beta_end=_SUPERRES.noise_beta_end
    ),
}


def toy_model(x, t):
    """Keep in sync with tests/reference/scheduler_oracle.py::toy_model."""
    t = t.astype(jnp.float32)[:, None, None, None]
    return 0.8 * jnp.tanh(x) + 0.05 * x * (t / 1000.0) + 0.1 * jnp.cos(t / 200.0)


def _cases():
    cases = []

    def add(name, sampler, schedule=None, num_steps=NUM_STEPS, **options):
        cases.append(
            dict(name=name, sampler=sampler, schedule=dict(SCHEDULE, **(schedule or {})), steps=num_steps, **options)
        )

    for spacing in samplers.SPACINGS:
        for pred in PREDICTIONS:
            tag = f"{spacing}_{pred}"
            add(f"ddpm_{tag}", "ddpm", prediction_type=pred, spacing=spacing)
            add(f"ddim_{tag}", "ddim", prediction_type=pred, spacing=spacing)
            add(f"dpmpp_2m_{tag}", "dpmpp_2m", prediction_type=pred, spacing=spacing)
            add(f"euler_{tag}", "euler", prediction_type=pred, spacing=spacing)
            if pred != "sample":  # diffusers' PNDM and Euler-ancestral reject x0 prediction
                add(f"pndm_{tag}", "pndm", prediction_type=pred, spacing=spacing)
                add(f"euler_ancestral_{tag}", "euler_ancestral", prediction_type=pred, spacing=spacing)
    # Options beyond the defaults.
    add(
        "ddpm_clip_fixed_large_linear",
        "ddpm",
        {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
        clip_sample=True,
        variance_type="fixed_large",
        steps_offset=0,
    )
    add("ddim_eta1", "ddim", eta=1.0)
    add("ddim_eta05_alpha_one_clip", "ddim", eta=0.5, set_alpha_to_one=True, clip_sample=True)
    add(
        "ddim_zero_snr_trailing_v",
        "ddim",
        {"rescale_betas_zero_snr": True},
        prediction_type="v_prediction",
        spacing="trailing",
    )
    add("pndm_prk", "pndm", skip_prk_steps=False, steps_offset=0)
    add("pndm_prk_v_linspace", "pndm", skip_prk_steps=False, prediction_type="v_prediction", spacing="linspace")
    add("dpmpp_2m_karras", "dpmpp_2m", karras_sigmas=True)
    add("dpmpp_2m_karras_v", "dpmpp_2m", karras_sigmas=True, prediction_type="v_prediction")
    add("dpmpp_2m_cosine", "dpmpp_2m", {"beta_schedule": "squaredcos_cap_v2"})
    add("euler_karras_cosine", "euler", {"beta_schedule": "squaredcos_cap_v2"}, karras_sigmas=True)
    add("ddim_cosine_linear_trailing", "ddim", {"beta_schedule": "squaredcos_cap_v2"}, spacing="trailing")
    add("dpmpp_2m_heun_20", "dpmpp_2m", num_steps=20, solver_type="heun")
    add("dpmpp_2m_20_sigma_min", "dpmpp_2m", num_steps=20, final_sigmas_type="sigma_min")
    add("dpmpp_1", "dpmpp_2m", solver_order=1)
    add(
        "dpmpp_2m_zero_snr_v",
        "dpmpp_2m",
        {"rescale_betas_zero_snr": True},
        prediction_type="v_prediction",
        spacing="trailing",
    )
    add("euler_karras", "euler", karras_sigmas=True)
    add(
        "euler_karras_sigma_min_v",
        "euler",
        karras_sigmas=True,
        final_sigmas_type="sigma_min",
        prediction_type="v_prediction",
    )
    add(
        "euler_zero_snr_v",
        "euler",
        {"rescale_betas_zero_snr": True},
        prediction_type="v_prediction",
        spacing="trailing",
    )
    add(
        "euler_ancestral_zero_snr_v",
        "euler_ancestral",
        {"rescale_betas_zero_snr": True},
        prediction_type="v_prediction",
        spacing="trailing",
    )
    return cases


CASES = _cases()


def _options(case) -> samplers.SamplerOptions:
    fields = {k: v for k, v in case.items() if k not in ("name", "sampler", "schedule", "steps")}
    return samplers.SamplerOptions(name=case["sampler"], num_steps=case["steps"], **fields)


def _make(case):
    s = case["schedule"]
    schedule = make_schedule(
        s["beta_schedule"],
        s["num_train_timesteps"],
        s["beta_start"],
        s["beta_end"],
        s.get("rescale_betas_zero_snr", False),
    )
    return samplers.make_sampler(_options(case), schedule, beta_schedule=s["beta_schedule"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Runs every case through diffusers once; returns (x_T, per-case noise, reference outputs)."""
    tmp = tmp_path_factory.mktemp("schedulers")
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    inputs, specs = {"x_T": x_T}, []
    for case in CASES:
        sampler = _make(case)
        if sampler.stochastic:
            inputs[f"noise_{case['name']}"] = rng.standard_normal((sampler.num_evals, *SHAPE)).astype(np.float32)
        opts = _options(case)
        sample = dict(dataclasses.asdict(opts), sampler=opts.name)
        diffusion = dict(case["schedule"], prediction_type=opts.prediction_type)
        config = scheduler_to_diffusers(diffusion, sample)
        kwargs = {"eta": opts.eta} if opts.name == "ddim" else {}
        specs.append(
            dict(
                name=case["name"],
                scheduler=config["_class_name"],
                config=config,
                num_steps=case["steps"],
                step_kwargs=kwargs,
            )
        )
    inputs["x0"] = rng.standard_normal(SHAPE).astype(np.float32)
    inputs["noise"] = rng.standard_normal(SHAPE).astype(np.float32)
    inputs["t"] = np.array([0, 999], np.int64)
    schedules = [dict(name=name, config=dict(cfg, num_train_timesteps=1000)) for name, cfg in SCHEDULES.items()]
    np.savez(tmp / "inputs.npz", **inputs)
    spec = dict(cases=specs, schedules=schedules, inputs=str(tmp / "inputs.npz"), outputs=str(tmp / "outputs.npz"))
    with open(tmp / "spec.json", "w") as f:
        json.dump(spec, f)
    run_reference(os.path.join(ROOT, "tests", "reference", "scheduler_oracle.py"), str(tmp / "spec.json"))
    return x_T, inputs, dict(np.load(tmp / "outputs.npz"))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_trajectory_matches_diffusers(case, reference):
    x_T, inputs, ref = reference
    sampler = _make(case)
    np.testing.assert_allclose(sampler.timesteps, ref[f"t_{case['name']}"], rtol=0, atol=1e-3)
    noise = inputs.get(f"noise_{case['name']}")
    run = jax.jit(lambda x, z: samplers.sample(sampler, toy_model, x, step_noise=z, return_intermediates=True)[1])
    ours = np.asarray(run(jnp.asarray(x_T), None if noise is None else jnp.asarray(noise)))
    want = ref[f"traj_{case['name']}"]
    assert ours.shape == want.shape
    rel = np.abs(ours - want).max(axis=(1, 2, 3, 4)) / np.abs(want).max(axis=(1, 2, 3, 4))
    print(f"{case['name']}: max rel err {rel.max():.2e}")
    tol = ILL_CONDITIONED_TOL if case["name"].startswith("euler") and "zero_snr" in case["name"] else REL_TOL
    assert rel.max() <= tol, f"per-step relative error {rel}"


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_and_forward_process_match_diffusers(name, reference):
    from ldm_jax.diffusion import objectives

    x_T, inputs, ref = reference
    cfg = SCHEDULES[name]
    schedule = make_schedule(
        cfg["beta_schedule"],
        1000,
        cfg.get("beta_start", 1e-4),
        cfg.get("beta_end", 0.02),
        cfg.get("rescale_betas_zero_snr", False),
    )
    betas, abar = np.asarray(schedule.betas), np.asarray(schedule.alphas_cumprod)
    if "zero_snr" not in name:
        # Betas are computed in float64 and rounded once (torch builds them in float32), hence not bit-equal. The
        # zero-SNR rescale then differences nearby float32 square roots, so its betas agree only to ~1e-3
        # relative on both sides; what the samplers use, alpha_bar, is compared for every schedule below.
        np.testing.assert_allclose(betas, ref[f"betas_{name}"], rtol=2e-6)
    np.testing.assert_allclose(abar, ref[f"alphas_cumprod_{name}"], rtol=1e-4, atol=1e-7)
    if "zero_snr" in name:
        assert abar[-1] == 0.0 and abar[0] == pytest.approx(ref[f"alphas_cumprod_{name}"][0], rel=1e-6)
    x0, noise, t = (jnp.asarray(inputs[k]) for k in ("x0", "noise", "t"))
    # sqrt(1 - alpha_bar[0]) carries the reference's float32 rescale error (~1e-3 relative of 6e-3) for zero SNR.
    atol = 5e-5 if "zero_snr" in name else 1e-5
    np.testing.assert_allclose(objectives.add_noise(schedule, x0, noise, t), ref[f"add_noise_{name}"], atol=atol)
    velocity = objectives.training_target("v_prediction", schedule, x0, noise, t)
    np.testing.assert_allclose(velocity, ref[f"velocity_{name}"], atol=atol)
