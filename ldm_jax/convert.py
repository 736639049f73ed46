"""Import Stable Diffusion weights: a diffusers pipeline folder or an original single-file checkpoint.

  python -m ldm_jax.convert --src=path/to/stable-diffusion-v1-5 --out=runs/sd15
  python -m ldm_jax.convert --src=v1-5-pruned-emaonly.safetensors --out=runs/sd15
  python -m ldm_jax.convert --src=sd-v1-4.ckpt --allow_pickle --out=runs/sd14
  python -m ldm_jax.convert --src=v2-1_768-ema-pruned.safetensors --prediction_type=v_prediction --out=runs/sd21

Writes ``<out>`` (a txt2img workdir, or an inpainting workdir for 9-channel inpainting UNets: text encoder + UNet,
config naming the first stage) and ``<out>/first_stage`` (an autoencoder workdir), plus ``<out>/conversion.json`` (tensor counts and the source keys deliberately not
converted). Then:
  python -m ldm_jax.sample --workdir=<out> --prompt="a photo of a cat"
  python -m ldm_jax.train --config=configs/txt2img.py --config.init_from=<out> ...   (fine-tuning)
Every tensor must fit the model: a missing, unexpected or mis-shaped key stops the conversion with a list of keys.
"""

from __future__ import annotations

import json
import os
import resource
import time

from absl import app, flags

from ldm_jax import user_errors

_SRC = flags.DEFINE_string("src", None, "A diffusers pipeline folder, or a .safetensors / .ckpt single file.")
_OUT = flags.DEFINE_string("out", None, "Output workdir (must not exist or be empty, unless --overwrite).")
_CONFIG_DIR = flags.DEFINE_string(
    "config_dir",
    "",
    "Single file only: a diffusers pipeline folder whose config.json files give the architecture "
    "(default: inferred from tensor shapes for standard SD 1.x / 2.x checkpoints).",
)
_PREDICTION = flags.DEFINE_enum(
    "prediction_type",
    "",
    ["", "epsilon", "v_prediction", "sample"],
    "Single file only: what the UNet predicts (SD 2.x 768-v models: v_prediction). Default: epsilon.",
)
_ALLOW_PICKLE = flags.DEFINE_bool(
    "allow_pickle", False, "Allow reading pickled weights (.ckpt/.bin) with torch.load(weights_only=True)."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --out.")
flags.mark_flags_as_required(["src", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ldm_jax import jax_setup, storage
    from ldm_jax.interop import stable_diffusion
    from ldm_jax.training.reporting import quiet_library_logs

    quiet_library_logs()
    jax_setup.configure()
    src = _SRC.value
    t0 = time.perf_counter()
    if os.path.isdir(src):
        if _CONFIG_DIR.value or _PREDICTION.value:
            raise app.UsageError("--config_dir and --prediction_type apply to single-file checkpoints only")
        pipe = stable_diffusion.load_diffusers_folder(src, _ALLOW_PICKLE.value)
    elif os.path.isfile(src):
        pipe = stable_diffusion.load_single_file(src, _CONFIG_DIR.value, _ALLOW_PICKLE.value, _PREDICTION.value)
    else:
        raise app.UsageError(f"--src={src}: no such file or folder")
    t1 = time.perf_counter()
    record = stable_diffusion.write_workdirs(pipe, _OUT.value, os.path.abspath(src), _OVERWRITE.value)
    t2 = time.perf_counter()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = dict(
        out=storage.absolute(_OUT.value),
        parameters=record["parameters"],
        ignored_source_keys=len(record["ignored_source_keys"]),
        read_convert_s=round(t1 - t0, 1),
        write_s=round(t2 - t1, 1),
        peak_rss_mib=round(peak_mib),
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    user_errors.run(main)
