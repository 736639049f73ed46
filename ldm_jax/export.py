"""Export a trained txt2img (inpainting) workdir as a diffusers ``StableDiffusionPipeline``
(``StableDiffusionInpaintPipeline``) folder that PyTorch loads.

  python -m ldm_jax.export --workdir=runs/demo/txt2img --out=exported/demo
  # then, in a PyTorch environment:
  #   StableDiffusionPipeline.from_pretrained("exported/demo")

Writes unet/, vae/ (from the run's first stage), text_encoder/, tokenizer/ and scheduler/ (the diffusers
scheduler matching the run's ``sample.sampler`` and training schedule) as safetensors + config.json, EMA weights by default. The folder appears only when complete.

A LoRA run (``lora.rank`` > 0, e.g. configs/dreambooth.py):
  python -m ldm_jax.export --workdir=runs/dog_lora --lora_only --out=dog.safetensors
  #   pipe.load_lora_weights("dog.safetensors")    (diffusers/PEFT layout; the run's alpha / rank folded in)
  python -m ldm_jax.export --workdir=runs/dog_lora --merge --out=exported/dog   (a whole pipeline, adapters merged)
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from ldm_jax import user_errors

_WORKDIR = flags.DEFINE_string("workdir", None, "A txt2img or inpainting workdir (trained or converted).")
_OUT = flags.DEFINE_string("out", None, "Output folder (must not exist or be empty, unless --overwrite).")
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "params"], "Which weights of the checkpoint to export.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --out.")
_LORA_ONLY = flags.DEFINE_bool("lora_only", False, "A LoRA run: write its adapters alone to --out (*.safetensors).")
_MERGE = flags.DEFINE_bool("merge", False, "A LoRA run: write a whole pipeline with the adapters merged in.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ldm_jax import jax_setup
    from ldm_jax.interop import stable_diffusion
    from ldm_jax.training.reporting import quiet_library_logs

    quiet_library_logs()
    jax_setup.configure()
    from ldm_jax import config_lib
    from ldm_jax.models import lora

    try:
        cfg = config_lib.load_config(os.path.join(_WORKDIR.value, "config.json"))
    except (OSError, ValueError) as e:
        raise app.UsageError(str(e)) from e
    is_lora = lora.from_run_config(cfg).enabled
    if _LORA_ONLY.value and _MERGE.value:
        raise app.UsageError("--lora_only and --merge: choose one (the adapters alone, or a pipeline with them merged)")
    if (_LORA_ONLY.value or _MERGE.value) and not is_lora:
        raise app.UsageError(
            f"--workdir={_WORKDIR.value}: not a LoRA run (lora.rank=0); export it without --lora_only/--merge"
        )
    if is_lora and not (_LORA_ONLY.value or _MERGE.value):
        raise app.UsageError(
            f"--workdir={_WORKDIR.value}: a LoRA run; pass --lora_only (the adapters, *.safetensors) or --merge (a "
            "whole pipeline with them merged)"
        )
    try:
        if _LORA_ONLY.value:
            info = stable_diffusion.export_lora(_WORKDIR.value, _OUT.value, _WEIGHTS.value, _OVERWRITE.value)
        else:
            info = stable_diffusion.export_workdir(_WORKDIR.value, _OUT.value, _WEIGHTS.value, _OVERWRITE.value)
    except (FileExistsError, ValueError) as e:
        raise app.UsageError(str(e)) from e
    print(json.dumps(info))


if __name__ == "__main__":
    user_errors.run(main)
