"""Mask-conditioned text-to-image inpainting: the txt2img model (configs/txt2img.py) with the mask and the masked
image's latents concatenated to its input (9 UNet input channels for a 4-channel first stage), trained on random box
masks and, a quarter of the time, the whole image (as Stable Diffusion's inpainting models were).

Run (after training the first stage named by first_stage.workdir):
  python -m ldm_jax.train --config=configs/inpainting.py:demo --workdir=runs/demo/inpainting
  python -m ldm_jax.sample --workdir=runs/demo/inpainting --init_image=photo.png --mask_image=mask.png \\
      --prompt="a small red circle in the center on a black background"
  python -m ldm_jax.evaluate --workdir=runs/demo/inpainting --split=heldout    (repaint each object from its caption)
Fine-tuning an imported SD inpainting checkpoint (python -m ldm_jax.convert --src=<sd-inpainting folder> --out=...):
  python -m ldm_jax.train --config=configs/inpainting.py --config.init_from=<out> ...
init_from may also name a txt2img run or import: its UNet gets zero weights for the extra input channels (how SD's
inpainting models were started), so training begins from exactly the text-to-image model.
Presets: sd (default, pod scale), demo (CPU minutes: the txt2img demo fine-tuned into an inpainting model, on its
f=2 first stage; train runs/demo/txt2img first: bash launch/local.sh demo), tiny (tests); see configs/txt2img.py.
"""

from configs import txt2img
from ldm_jax import config_lib
from ldm_jax.tasks.concat_inputs import InpaintingConfig

PRESETS = ("sd", "demo", "tiny")


def get_config(arg=None):
    preset = config_lib.parse_preset(arg, PRESETS)
    c = txt2img.get_config(preset)
    c.preset = preset
    c.task = "inpainting"
    # Each training mask is the union of 1..max_boxes random boxes with sides between min_box_fraction and
    # max_box_fraction of the image side; full_mask_prob of them cover the whole image (text-to-image from the same
    # model).
    c.inpainting = InpaintingConfig.defaults(
        max_boxes=3, min_box_fraction=0.1, max_box_fraction=0.6, full_mask_prob=0.25
    )
    if preset == "demo":
        # The txt2img demo's weights, UNet, first stage (f=2) and recipe: the extra input channels start at zero, so
        # step 0 is that model, which already draws the shape a caption asks for. Held-out repainting (256, DDIM 25,
        # guidance 3) after 500 / 1000 / 1500 steps: shape 0.863 / 0.910 / 0.910, colour >= 0.992, kept-region
        # PSNR 33.5-33.8 dB (README, Concat-conditioned demos); trained from scratch at f=4 it drew shape 0.258.
        c.init_from = "runs/demo/txt2img"
        c.train.update(num_steps=1000, checkpoint_every=500, preview_every=500)
    return c
