"""Named random streams: the ids given to ``jax.random.fold_in`` to derive independent draws from one key.

Each value is part of what a seed means: changing one changes every image sampled and every run trained with it
(a resumed run stays exact, an old run no longer reproduces). So the values are fixed, and a new use of a key takes
a new id rather than reusing or renumbering one.
"""

# The per-image sampling key, jax.random.key(seed of image i) (LatentDiffusionTask.generate_fn): image i depends only
# on its own key and inputs, never on the batch it was generated in.
START_NOISE = 0  # x_T, the latents the sampler starts from
SAMPLER_STEP_NOISE = 1  # the per-step noise of stochastic samplers (DDPM, DDIM eta > 0, Euler ancestral)
INIT_IMAGE_POSTERIOR = 2  # the posterior sample of an init image (image-to-image, latent inpainting)
MASKED_IMAGE_POSTERIOR = 3  # the posterior sample of the masked image (inpainting models' concat input)
LOW_RES_NOISE = 4  # the noise augmentation of a super-resolution model's low-resolution input
# The per-example key of condition binding (evaluation.binding), jax.random.key(seed of example i); its posterior
# sample is INIT_IMAGE_POSTERIOR's draw (LatentSpace.encode_images).
BINDING_NOISE = 5  # the noise an example's latents are denoised from, the same under every condition

# The train step's key (besides its five-way split into posterior, timestep, noise, condition-drop and dropout keys).
TRAINING_CONCAT_INPUTS = 6  # concat conditioning drawn per batch: inpainting masks, super-resolution noise levels

# The noise key of a training batch.
OFFSET_NOISE_SHIFT = 1  # the per-example, per-channel shift of offset noise
