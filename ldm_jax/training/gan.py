"""The adversarial first-stage step: autoencoder (generator) and patch discriminator updated in one jitted call.

As in taming-transformers / CompVis latent-diffusion (``LPIPSWithDiscriminator``, ``VQLPIPSWithDiscriminator``):

  generator  loss = nll + reg + d_weight * disc_factor * g_loss,   g_loss = -mean(D(rec))
  d_weight       = ||grad_L nll|| / (||grad_L g_loss|| + 1e-4), clipped to [0, 1e4], times ``disc_weight``
                   (L: the decoder's last layer; the weight balances the two terms' pull on the output)
  discriminator  loss = disc_factor * hinge or vanilla loss on D(x) and D(sg(rec))
  disc_factor    = ``disc_factor`` from step ``disc_start`` on, 0 before

``nll`` and ``reg`` come from the task (L1/LPIPS reconstruction with learned log-variance and KL, or codebook and
commitment terms). One forward of the autoencoder serves both updates: the discriminator sees the reconstructions
of this step's generator forward, taken before the generator's update; the reference runs the autoencoder a second
time after it, which costs a forward and changes nothing in expectation.

Before ``disc_start`` the adversarial backward pass and the discriminator update are still computed, and their
results are discarded with ``jnp.where`` (the discriminator's parameters and optimizer state stay as they were), as
the reference also computes them. Not a ``lax.cond``: XLA:CPU runs the convolutions inside a conditional's branch
about 20x slower (photos_f4 model, batch 16: 11 s per step in the branch vs 0.54 s outside it; computing both
and selecting costs 0.67 s per step in either phase).

Gradient accumulation (``accum_steps = k > 1``, ``training.steps.accumulate``: the same micro-batches and
randomness streams as the diffusion step): each micro-batch's forward gives the gradients of nll + reg and of
g_loss, and, from its reconstructions, the discriminator's gradients; each is averaged over the micro-batches.
d_weight is then computed from the full batch's two gradients, and the generator's gradient
rec + d_weight * factor * adv is linear in them, so both equal the full-batch step's. The VQ EMA codebook update
sees the whole batch: the micro-batches' latents and code indices are concatenated back in the batch's row order
(the EMA statistics are the same segment sums as for the full batch). Metrics are means over micro-batches: exact
for batch means, not for a codebook perplexity. The one non-exact part: a "batch"-normalised discriminator
normalises with each micro-batch's statistics, not the full batch's (as per-GPU BatchNorm under DDP in the
reference); with ``disc.norm="none"`` the accumulated step equals the full-batch step up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ldm_jax.training.state import TrainState, zero_counters
from ldm_jax.training.steps import accumulate, finish_step

DISC_LOSSES = ("hinge", "vanilla")
ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4

# rec_loss_fn(params, loss_params, frozen, batch, rng) -> (nll, reg, reconstructions [B, H, W, C], aux dict)
RecLossFn = Callable[[Any, Any, Any, dict, jax.Array], tuple[jax.Array, jax.Array, jax.Array, dict]]


@flax.struct.dataclass
class GANTrainState(TrainState):
    loss_params: Any  # trained by the generator's optimizer beside ``params`` (the learned log-variance)
    disc_params: Any  # {} when the discriminator is off
    disc_opt_state: Any
    model_state: Any  # updated outside the optimizers: EMA codebook statistics, {} otherwise

    @classmethod
    def create_gan(cls, params, loss_params, disc_params, model_state, tx, disc_tx) -> GANTrainState:
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=tx.init({"model": params, "loss": loss_params}),
            loss_params=loss_params,
            disc_params=disc_params,
            disc_opt_state=disc_tx.init(disc_params),
            model_state=model_state,
            **zero_counters(),
        )


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def disc_loss_fn(name: str):
    if name not in DISC_LOSSES:
        raise ValueError(f"disc.loss={name!r}: must be one of {DISC_LOSSES}")
    return hinge_d_loss if name == "hinge" else vanilla_d_loss


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
    """The generator's adversarial weight from the two losses' gradients at the decoder's last layer."""
    w = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + ADAPTIVE_WEIGHT_EPS)
    return jnp.clip(w, 0.0, ADAPTIVE_WEIGHT_MAX) * disc_weight


def gan_train_step(
    state: GANTrainState,
    frozen: Any,
    batch: dict,
    rng: jax.Array,
    *,
    rec_loss_fn: RecLossFn,
    last_layer: Callable[[Any], jax.Array],
    disc_apply: Callable[[Any, jax.Array], jax.Array] | None,
    disc_loss: Callable[[jax.Array, jax.Array], jax.Array],
    disc_start: int,
    disc_weight: float,
    disc_factor: float,
    update_model_state: Callable[[Any, Any, dict], tuple[Any, Any]] | None,
    tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    ema_decay: float,
    accum_steps: int = 1,
) -> tuple[GANTrainState, dict]:
    """One generator and one discriminator update. ``disc_apply`` None: no discriminator (reconstruction only).
    ``accum_steps``: micro-batches the gradients are accumulated over (see the module docstring)."""
    step_rng = jax.random.fold_in(rng, state.step)
    gen = {"model": state.params, "loss": state.loss_params}
    disc_on = state.step >= disc_start
    zero = jnp.zeros(())

    def d_objective(dp, real, fake):
        real_logits, fake_logits = disc_apply(dp, real), disc_apply(dp, fake)
        return disc_factor * disc_loss(real_logits, fake_logits), (jnp.mean(real_logits), jnp.mean(fake_logits))

    def micro_step(b, r):
        """The gradients of one (micro-)batch: of nll + reg and of g_loss for the generator, the discriminator's."""

        def forward(g):
            nll, reg, rec, aux = rec_loss_fn(g["model"], g["loss"], frozen, b, r)
            g_loss = -jnp.mean(disc_apply(state.disc_params, rec)) if disc_apply is not None else jnp.zeros(())
            return (nll, reg, g_loss), (rec, aux)

        (nll, reg, g_loss), pullback, (rec, aux) = jax.vjp(forward, gen, has_aux=True)
        (rec_grads,) = pullback((jnp.ones(()), jnp.ones(()), zero))
        grads = {"rec": rec_grads}
        values = {"nll": nll, "reg": reg, "aux": {k: v for k, v in aux.items() if not k.startswith("_")}}
        rows = {k: v for k, v in aux.items() if k.startswith("_")}  # per-example latents and codes
        if disc_apply is not None:
            (grads["adv"],) = pullback((zero, zero, jnp.ones(())))
            # The discriminator sees this forward's reconstructions (its parameters are fixed within the step).
            fake = jax.lax.stop_gradient(rec)
            (d_loss, (logits_real, logits_fake)), grads["disc"] = jax.value_and_grad(d_objective, has_aux=True)(
                state.disc_params, b["image"], fake
            )
            values.update(g_loss=g_loss, disc_loss=d_loss, logits_real=logits_real, logits_fake=logits_fake)
        return grads, values, rows

    like = {"rec": gen} if disc_apply is None else {"rec": gen, "adv": gen, "disc": state.disc_params}
    grads, values, rows = accumulate(micro_step, batch, step_rng, accum_steps, like)
    nll, reg = values["nll"], values["reg"]
    metrics = {"nll": nll, "reg": reg}
    if disc_apply is not None:
        # From the full batch's gradients. ``reg`` (KL or codebook terms) does not reach the decoder's last layer,
        # so there the gradient of nll + reg is the gradient of nll: no third backward pass.
        d_weight = adaptive_weight(last_layer(grads["rec"]["model"]), last_layer(grads["adv"]["model"]), disc_weight)
        d_weight = jnp.where(disc_on, d_weight, 0.0)
        factor = jnp.where(disc_on, disc_factor, 0.0)
        gen_grads = jax.tree.map(lambda a, b: a + d_weight * factor * b, grads["rec"], grads["adv"])
        loss = nll + reg + d_weight * factor * values["g_loss"]
        metrics.update(g_loss=values["g_loss"], d_weight=d_weight, disc_factor=factor)
    else:
        gen_grads, loss = grads["rec"], nll + reg

    finite = None
    if disc_apply is not None:
        d_loss, logits_real, logits_fake = (
            jnp.where(disc_on, values[k], zero) for k in ("disc_loss", "logits_real", "logits_fake")
        )
        metrics.update(disc_loss=d_loss, logits_real=logits_real, logits_fake=logits_fake)
        finite = jnp.isfinite(d_loss)

    def update(s):
        g = {"model": s.params, "loss": s.loss_params}
        updates, opt_state = tx.update(gen_grads, s.opt_state, g)
        g = optax.apply_updates(g, updates)
        params, model_state = g["model"], s.model_state
        if update_model_state is not None:
            params, model_state = update_model_state(params, model_state, {**values["aux"], **rows})
        disc_params, disc_opt_state = s.disc_params, s.disc_opt_state
        if disc_apply is not None:

            def disc_update(d):
                d_updates, new_opt = disc_tx.update(grads["disc"], d[1], d[0])
                return optax.apply_updates(d[0], d_updates), new_opt

            # A cond for the reason of ``state.skip_if_nonfinite``: the discriminator's buffers updated in place.
            disc_params, disc_opt_state = jax.lax.cond(disc_on, disc_update, lambda d: d, (disc_params, disc_opt_state))
        return s.replace(
            params=params,
            opt_state=opt_state,
            loss_params=g["loss"],
            disc_params=disc_params,
            disc_opt_state=disc_opt_state,
            model_state=model_state,
        )

    return finish_step(
        state,
        update,
        loss=loss,
        grads=gen_grads,
        metrics={**metrics, **values["aux"]},
        lr_schedule=lr_schedule,
        ema_decay=ema_decay,
        finite=finite,
    )
