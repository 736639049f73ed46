"""Export a trained txt2img (inpainting) workdir as a diffusers ``StableDiffusionPipeline``
(``StableDiffusionInpaintPipeline``) folder that PyTorch loads.

  python -m ldm_jax.export --workdir=runs/demo/txt2img --out=exported/demo
  # then, in a PyTorch environment:
  #   StableDiffusionPipeline.from_pretrained("exported/demo")

Writes unet/, vae/ (from the run's first stage), text_encoder/, tokenizer/ and scheduler/ (the diffusers
scheduler matching the run's ``sample.sampler`` and training schedule) as safetensors + config.json, EMA weights by default. The folder appears only when complete.
"""

from __future__ import annotations

import json

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A txt2img or inpainting workdir (trained or converted).")
_OUT = flags.DEFINE_string("out", None, "Output folder (must not exist or be empty, unless --overwrite).")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "params"], "Which weights of the checkpoint to export.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --out.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ldm_jax.interop import stable_diffusion
    from ldm_jax import jax_setup
    from ldm_jax.training.reporting import quiet_library_logs

    quiet_library_logs()
    jax_setup.configure()
    info = stable_diffusion.export_workdir(_WORKDIR.value, _OUT.value, _WEIGHTS.value, _OVERWRITE.value)
    print(json.dumps(info))


if __name__ == "__main__":
    app.run(main)
