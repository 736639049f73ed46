import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import objectives, samplers
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
    ts = samplers.inference_timesteps(1000, 10, "leading", 1)
    assert ts.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert samplers.inference_timesteps(1000, 4, "trailing", 0).tolist() == [999, 749, 499, 249]


def test_ddim_with_oracle_recovers_x0_and_is_one_scan():
    s = make_schedule()
    x0 = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    traces = []

    def oracle(x, t):
        # The exact epsilon for data concentrated at x0: DDIM(eta=0) must land on x0.
        traces.append(1)
        abar = s.alphas_cumprod[t][:, None, None, None]
        return (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)

    x_T = jax.random.normal(jax.random.key(1), x0.shape)
    run = jax.jit(lambda x: samplers.ddim_sample(oracle, s, x, 20, jax.random.key(2), set_alpha_to_one=True))
    out = run(x_T)
    np.testing.assert_allclose(out, x0, atol=1e-4)
    # The model function is traced once for 20 steps: the loop is a lax.scan, not unrolled Python.
    assert len(traces) == 1
    jaxpr = jax.make_jaxpr(lambda x: samplers.ddim_sample(oracle, s, x, 20, jax.random.key(2)))(x_T)
    assert any(eqn.primitive.name == "scan" for eqn in jaxpr.jaxpr.eqns)
    final, inter = samplers.ddim_sample(oracle, s, x_T, 5, jax.random.key(2), return_intermediates=True)
    assert inter.shape == (5, *x0.shape)
    np.testing.assert_array_equal(inter[-1], final)


def test_classifier_free_guidance_combines_one_batched_call():
    calls = []

    def apply(x, t, ctx):
        calls.append(x.shape[0])
        return x * ctx[:, :1, :1, None].reshape(-1, 1, 1, 1)

    x = jnp.ones((3, 2, 2, 1))
    cond = jnp.full((3, 1, 1), 2.0)
    uncond = jnp.full((3, 1, 1), 0.5)
    out = samplers.classifier_free_guidance(apply, cond, uncond, 4.0)(x, jnp.zeros((3,), jnp.int32))
    np.testing.assert_allclose(out, 0.5 + 4.0 * (2.0 - 0.5))
    assert calls == [6]
