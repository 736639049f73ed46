import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import guidance, objectives, samplers
from ldm_jax.diffusion.schedules import make_schedule


def test_schedules_match_their_formulas():
    s = make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    betas = np.asarray(s.betas, np.float64)
    np.testing.assert_allclose(betas[[0, -1]], [0.00085, 0.012], rtol=1e-6)
    np.testing.assert_allclose(np.sqrt(betas), np.linspace(0.00085**0.5, 0.012**0.5, 1000), rtol=1e-6)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-5)
    lin = make_schedule("linear", 1000, 1e-4, 0.02)
    np.testing.assert_allclose(lin.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-6)
    cos = make_schedule("squaredcos_cap_v2", 1000)
    assert float(cos.betas.max()) <= float(np.float32(0.999)) and bool(jnp.all(jnp.diff(cos.alphas_cumprod) < 0))
    with pytest.raises(ValueError, match="beta_schedule"):
        make_schedule("quadratic")


@pytest.mark.parametrize("pred", objectives.PREDICTION_TYPES)
def test_targets_and_conversions_are_inverse(pred):
    s = make_schedule()
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k1, (4, 8, 8, 4))
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 10, 500, 999])
    x_t = objectives.add_noise(s, x0, noise, t)
    target = objectives.training_target(pred, s, x0, noise, t)
    abar = s.alphas_cumprod[t][:, None, None, None]
    x0_hat, eps_hat = objectives.predict_x0_eps(pred, abar, x_t, target)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-3 if pred == "epsilon" else 1e-4)
    np.testing.assert_allclose(eps_hat, noise, atol=1e-4 if pred != "sample" else 2e-3)


def test_leading_timesteps_match_diffusers():
    # DDIMScheduler(steps_offset=1).set_timesteps(10) with 1000 training steps.
    ts = samplers.spaced_timesteps(1000, 10, "leading", 1)
    assert ts.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert samplers.spaced_timesteps(1000, 4, "trailing", 0).tolist() == [999, 749, 499, 249]


def _oracle_for(schedule, x0):
    """The exact epsilon for data concentrated at x0 (t may be fractional: interpolate alpha_bar)."""

    def oracle(x, t):
        abar = jnp.interp(t, jnp.arange(schedule.num_train_timesteps), schedule.alphas_cumprod)[:, None, None, None]
        return (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)

    return oracle


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_sampler_is_one_scan_and_lands_on_the_data_with_an_exact_model(name):
    s = make_schedule()
    x0 = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    traces = []
    oracle = _oracle_for(s, x0)

    def model(x, t):
        traces.append(1)
        return oracle(x, t)

    sampler = samplers.make_sampler(samplers.SamplerOptions(name=name, num_steps=20, set_alpha_to_one=True), s)
    x_T = jax.random.normal(jax.random.key(1), x0.shape)
    run = jax.jit(lambda x, k: samplers.sample(sampler, model, x, rng=k, return_intermediates=True))
    out, inter = run(x_T, jax.random.split(jax.random.key(2), 2))
    # The model function is traced once for every step: the loop is a lax.scan, not unrolled Python.
    assert len(traces) == 1
    jaxpr = jax.make_jaxpr(lambda x: samplers.sample(sampler, model, x, rng=jax.random.key(2)))(x_T)
    assert any(eqn.primitive.name == "scan" for eqn in jaxpr.jaxpr.eqns)
    assert inter.shape == (sampler.num_evals, *x0.shape)
    np.testing.assert_array_equal(inter[-1], out)
    # With the exact denoiser every sampler ends at the data (stochastic ones too: their noise is scaled away).
    np.testing.assert_allclose(out, x0, atol=2e-3 if name in ("ddpm", "euler_ancestral") else 5e-4)


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_every_sampler_lands_on_the_data_from_zero_terminal_snr_with_trailing_steps(name):
    """The zero-terminal-SNR recipe (v-prediction, trailing steps: the first step at alpha_bar = 0 exactly) with the
    exact v: PNDM's ratio form divided by alpha_bar there and returned NaN for every image."""
    s = make_schedule(rescale_betas_zero_snr=True)
    assert float(s.alphas_cumprod[-1]) == 0.0
    x0 = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))

    def v_oracle(x, t):
        a = jnp.interp(t, jnp.arange(s.num_train_timesteps), s.alphas_cumprod)[:, None, None, None]
        eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(jnp.maximum(1 - a, 1e-12))
        return jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0

    o = samplers.SamplerOptions(
        name=name, num_steps=25, spacing="trailing", prediction_type="v_prediction", set_alpha_to_one=True
    )
    out = samplers.sample(samplers.make_sampler(o, s), v_oracle, jax.random.normal(jax.random.key(1), x0.shape),
                          rng=jax.random.split(jax.random.key(2), 2))  # fmt: skip
    assert bool(jnp.all(jnp.isfinite(out)))
    # PLMS extrapolates the model's outputs over earlier steps, which an exact v does not make exact: 0.019 from the
    # plain schedule at these settings too.
    atol = {"ddpm": 2e-3, "euler_ancestral": 2e-3, "pndm": 0.03}.get(name, 5e-4)
    np.testing.assert_allclose(out, x0, atol=atol)


def test_every_step_count_gives_that_many_timesteps_in_the_trained_range():
    """Trailing spacing's arange left a last entry just above 0 for 62 step counts (61, 103, 121, ...), which rounded
    to t = -1: one evaluation too many, the last at alpha_bar[-1], the noisiest step (DDIM at 61 steps ended 40 away
    from the data with an exact model). Every count of every sampler, and the range rule of the other spacings."""
    from ldm_jax.diffusion.samplers.options import evaluated_timesteps

    for name in samplers.SAMPLERS:
        for n in range(1, 1001):
            ts = evaluated_timesteps(samplers.SamplerOptions(name=name, spacing="trailing"), n, 1000)
            assert len(ts) == n and ts.min() >= 0 and ts.max() == 999 and len(np.unique(ts)) == n, (name, n)
    for name in ("ddim", "ddpm", "pndm", "euler"):  # leading + steps_offset=1 reaches t = 1000 at 1000 steps
        samplers.SamplerOptions(name=name, num_steps=999).validate(1000)
        with pytest.raises(ValueError, match=rf"sample.num_steps=1000: .* {name}'s timesteps run from 1000 .*use "
                                             r"num_steps <= 999, or sample.spacing='trailing'"):  # fmt: skip
            samplers.SamplerOptions(name=name, num_steps=1000).validate(1000)
    # DPM-Solver++ spaces num_steps + 1 points: at 999 steps they reach 1000, at 1000 they collapse to one value.
    with pytest.raises(ValueError, match=r"--num_steps=999: .*use num_steps <= 998"):
        samplers.SamplerOptions(name="dpmpp_2m", num_steps=999).validate(1000, prefix="--")
    samplers.SamplerOptions(name="dpmpp_2m", num_steps=1000, spacing="trailing").validate(1000)


def test_stochastic_samplers_need_noise_and_deterministic_ones_ignore_it():
    s = make_schedule()
    x = jnp.ones((1, 2, 2, 1))
    model = lambda x, t: 0.1 * x  # noqa: E731
    with pytest.raises(ValueError, match="stochastic"):
        samplers.sample(samplers.make_sampler(samplers.SamplerOptions(name="ddpm", num_steps=3), s), model, x)
    ddim = samplers.make_sampler(samplers.SamplerOptions(name="ddim", num_steps=3), s)
    assert not ddim.stochastic
    np.testing.assert_array_equal(
        samplers.sample(ddim, model, x), samplers.sample(ddim, model, x, rng=jax.random.key(3))
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("name", "heun", "sample.sampler='heun': must be one of"),
        ("num_steps", 0, "sample.num_steps=0: must be in"),
        ("spacing", "uniform", "sample.spacing='uniform'"),
        ("solver_order", 3, "sample.solver_order=3: must be 1 or 2"),
        ("final_sigmas_type", "max", "sample.final_sigmas_type='max'"),
    ],
)
def test_sampler_options_name_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        samplers.SamplerOptions(**{field: value}).validate(1000)
    with pytest.raises(ValueError, match="karras_sigmas=True: supported by dpmpp_2m and euler"):
        samplers.SamplerOptions(name="euler_ancestral", karras_sigmas=True).validate(1000)


def test_starting_part_way_noises_the_image_to_the_first_steps_level():
    s = make_schedule()
    x0 = jnp.full((1, 2, 2, 1), 0.5)
    noise = jnp.zeros_like(x0)
    for name in ("ddim", "dpmpp_2m", "euler"):
        sampler = samplers.make_sampler(samplers.SamplerOptions(name=name, num_steps=10), s, first_step=6)
        assert sampler.num_evals == 4
        start = sampler.start(noise, x0)["x"]
        t = int(round(float(sampler.timesteps[0])))
        expect = 0.5 * (1.0 if name == "euler" else float(np.sqrt(s.alphas_cumprod[t])))
        np.testing.assert_allclose(start, expect, rtol=2e-3)
    with pytest.raises(ValueError, match="pndm"):
        samplers.make_sampler(samplers.SamplerOptions(name="pndm", num_steps=10), s, first_step=3)


def test_classifier_free_guidance_combines_one_batched_call():
    calls = []

    def apply(x, t, ctx):
        calls.append(x.shape[0])
        return x * ctx[:, :1, :1, None].reshape(-1, 1, 1, 1)

    x = jnp.ones((3, 2, 2, 1))
    cond = jnp.full((3, 1, 1), 2.0)
    uncond = jnp.full((3, 1, 1), 0.5)
    out = guidance.classifier_free_guidance(apply, cond, uncond, 4.0)(x, jnp.zeros((3,), jnp.int32))
    np.testing.assert_allclose(out, 0.5 + 4.0 * (2.0 - 0.5))
    assert calls == [6]


def test_guidance_rescale_matches_its_formula():
    k1, k2 = jax.random.split(jax.random.key(0))
    cond = np.asarray(jax.random.normal(k1, (2, 4, 4, 3)))
    uncond = np.asarray(0.5 * jax.random.normal(k2, (2, 4, 4, 3)))
    guided = uncond + 7.5 * (cond - uncond)
    # diffusers' rescale_noise_cfg, in numpy with the unbiased std it uses.
    std_c = cond.reshape(2, -1).std(axis=1, ddof=1)[:, None, None, None]
    std_g = guided.reshape(2, -1).std(axis=1, ddof=1)[:, None, None, None]
    want = 0.7 * guided * (std_c / std_g) + 0.3 * guided
    np.testing.assert_allclose(guidance.rescale_guided(jnp.asarray(guided), jnp.asarray(cond), 0.7), want, rtol=1e-5)
    np.testing.assert_array_equal(guidance.rescale_guided(jnp.asarray(guided), jnp.asarray(cond), 0.0), guided)


@pytest.mark.parametrize("pred", objectives.PREDICTION_TYPES)
def test_min_snr_weights_match_the_formula(pred):
    s = make_schedule()
    t = jnp.array([0, 100, 500, 999])
    abar = np.asarray(s.alphas_cumprod, np.float64)[np.asarray(t)]
    snr = abar / (1 - abar)
    want = {"epsilon": np.minimum(snr, 5.0) / snr, "v_prediction": np.minimum(snr, 5.0) / (snr + 1)}.get(
        pred, np.minimum(snr, 5.0)
    )
    np.testing.assert_allclose(objectives.loss_weights("min_snr", pred, s, t, 5.0), want, rtol=1e-5)
    np.testing.assert_array_equal(objectives.loss_weights("simple", pred, s, t), 1.0)
    # Zero terminal SNR: the epsilon weight takes its limit instead of 0/0.
    z = make_schedule(rescale_betas_zero_snr=True)
    w = objectives.loss_weights("min_snr", pred, z, jnp.array([999]))
    assert bool(jnp.all(jnp.isfinite(w)))


@pytest.mark.parametrize("pred", ("v_prediction", "sample"))
def test_min_snr_plus_one_caps_the_low_noise_steps_and_keeps_zero_snr_trained(pred):
    """min(SNR + 1, gamma) on the x0 error: the v weight is 1 up to SNR = gamma - 1 and gamma / (SNR + 1) after; at
    the zero-SNR top of a rescaled schedule it is 1 (min-SNR's is 0 there)."""
    s = make_schedule()
    t = jnp.array([0, 100, 500, 999])
    abar = np.asarray(s.alphas_cumprod, np.float64)[np.asarray(t)]
    snr = abar / (1 - abar)
    x0_weight = np.minimum(snr + 1, 5.0)
    want = x0_weight / (snr + 1) if pred == "v_prediction" else x0_weight
    np.testing.assert_allclose(objectives.loss_weights("min_snr_plus_one", pred, s, t, 5.0), want, rtol=1e-5)
    top = jnp.array([999])
    z = make_schedule(rescale_betas_zero_snr=True)
    np.testing.assert_allclose(objectives.loss_weights("min_snr_plus_one", pred, z, top, 5.0), 1.0, rtol=1e-6)
    assert float(objectives.loss_weights("min_snr", pred, z, top, 5.0)[0]) == 0.0
    with pytest.raises(ValueError, match="min_snr_plus_one"):
        objectives.loss_weights("min_snr_plus_one", "epsilon", s, t)


def test_offset_noise_adds_one_constant_per_example_and_channel():
    key = jax.random.key(0)
    plain = objectives.sample_noise(key, (64, 8, 8, 4))
    np.testing.assert_array_equal(plain, jax.random.normal(key, (64, 8, 8, 4)))
    shifted = objectives.sample_noise(key, (64, 8, 8, 4), offset=0.1)
    diff = np.asarray(shifted - plain)
    np.testing.assert_allclose(diff, diff[:, :1, :1, :].repeat(8, 1).repeat(8, 2), atol=1e-6)
    assert 0.05 < diff[:, 0, 0, :].std() < 0.2


def test_zero_terminal_snr_schedule_ends_at_zero_and_keeps_the_first_step():
    base, z = make_schedule(), make_schedule(rescale_betas_zero_snr=True)
    assert float(z.alphas_cumprod[-1]) == 0.0
    np.testing.assert_allclose(z.alphas_cumprod[0], base.alphas_cumprod[0], rtol=1e-6)
    assert bool(jnp.all(jnp.diff(z.alphas_cumprod) <= 0))


def test_latent_inpainting_keeps_the_known_region_exactly():
    s = make_schedule()
    x0 = jax.random.normal(jax.random.key(0), (1, 4, 4, 2))
    noise = jax.random.normal(jax.random.key(1), x0.shape)
    mask = jnp.zeros((1, 4, 4, 1)).at[:, :, :2].set(1.0)  # repaint the left half
    model = lambda x, t: jnp.tanh(x)  # noqa: E731
    for name in ("ddim", "pndm", "euler", "dpmpp_2m"):
        sampler = samplers.make_sampler(samplers.SamplerOptions(name=name, num_steps=5), s)
        blend = lambda x, i, sampler=sampler: mask * x + (1 - mask) * sampler.noised(x0, noise, i + 1)  # noqa: E731
        out = samplers.sample(sampler, model, noise, blend=blend)
        np.testing.assert_array_equal(out[:, :, 2:], x0[:, :, 2:])
        assert float(jnp.abs(out[:, :, :2] - x0[:, :, :2]).max()) > 0.1
