"""DreamBooth: fine-tune a converted Stable Diffusion (or any txt2img run) on a few images of one subject, with
prior preservation (ldm_jax/tasks/dreambooth.py); fully or with LoRA adapters.

  python -m ldm_jax.convert --src=<diffusers SD 1.x/2.x folder or .safetensors> --out=runs/sd15
  python -m ldm_jax.train --config=configs/dreambooth.py --workdir=runs/dog \\
      --config.init_from=runs/sd15 --config.dreambooth.instance_dir=data/dog \\
      --config.dreambooth.instance_prompt="a photo of sks dog" \\
      --config.dreambooth.class_dir=data/dog_class --config.dreambooth.class_prompt="a photo of a dog"
  python -m ldm_jax.sample --workdir=runs/dog --prompt="a photo of sks dog in a bucket"
  # LoRA (a few MB), then diffusers: pipe.load_lora_weights("dog.safetensors")
  python -m ldm_jax.train --config=configs/dreambooth.py:sd_lora ... --workdir=runs/dog_lora
  python -m ldm_jax.export --workdir=runs/dog_lora --lora_only --out=dog.safetensors

The model sections (UNet, text encoder, diffusion, first stage, latent scale) come from init_from's config.json
(dreambooth.model_from_init). Previews draw the instance and class prompts unless sample.prompts is set.
Presets:
  sd (default)  full fine-tuning (UNet; --config.text_encoder.trainable=True adds the text encoder), 512 px,
                lr 5e-6, 800 steps, batch 4 instance + 4 class images, no EMA (diffusers' recipe)
  sd_lora       LoRA rank 8 on the UNet's attention (add "text_attention" to lora.targets for the text encoder),
                base weights in bfloat16, lr 1e-4
  tiny          16 px, LoRA rank 4, a few steps: for tests
"""

from configs import txt2img
from ldm_jax import config_lib
from ldm_jax.tasks.dreambooth import dreambooth_section

PRESETS = ("sd", "sd_lora", "tiny")


def get_config(arg=None):
    preset = config_lib.parse_preset(arg, PRESETS)
    c = txt2img.get_config("tiny" if preset == "tiny" else "sd")
    c.preset = preset
    c.dreambooth = dreambooth_section(num_class_images=100 if preset != "tiny" else 8)
    c.data.source = ""  # the images are dreambooth.instance_dir's and class_dir's
    c.data.crop, c.data.random_flip = "random", False
    c.text_encoder.trainable = False
    c.diffusion.cond_drop_prob = 0.0  # the prompts stay: DreamBooth binds the identifier to the subject
    c.sample.prompts = ()  # () = the instance and class prompts
    if preset == "tiny":
        c.data.global_batch_size = 8
        c.lora.update(rank=4, alpha=4.0)
        c.optim.update(lr=1e-2, warmup_steps=0, ema_decay=0.0)
        c.train.update(num_steps=8, log_every=2, checkpoint_every=4, preview_every=0)
        return c
    c.data.image_size = 512
    c.data.global_batch_size = 4
    c.optim.update(lr=5e-6, warmup_steps=0, ema_decay=0.0, grad_clip=1.0)
    c.train.update(num_steps=800, log_every=10, checkpoint_every=200, preview_every=200)
    if preset == "sd_lora":
        c.lora.update(rank=8, alpha=8.0, base_dtype="bfloat16")
        c.optim.lr = 1e-4
    return c
