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
Presets: sd (default, pod scale), demo (CPU minutes), tiny (tests); see configs/txt2img.py.
"""

import ml_collections

from configs import txt2img
from ldm_jax import config_lib

PRESETS = txt2img.PRESETS


def get_config(arg=None):
    c = txt2img.get_config(config_lib.parse_preset(arg, PRESETS))
    c.task = "inpainting"
    c.inpainting = ml_collections.ConfigDict(
        dict(
            max_boxes=3,  # each training mask is the union of 1..max_boxes random boxes
            min_box_fraction=0.1,  # box sides, as fractions of the image side
            max_box_fraction=0.6,
            full_mask_prob=0.25,  # masks covering the whole image (text-to-image from the same model)
        )
    )
    return c
