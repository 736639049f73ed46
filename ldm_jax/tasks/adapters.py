"""LoRA on a latent diffusion task: the run trains adapters (``models/lora.py``) on the frozen weights of
``init_from``, and every use of the model (the loss, previews, sampling, export) sees the merged weights.

In a LoRA run the train state's params are the adapters alone ({"unet": ..., "text": ...} trees of lora_a /
lora_b), so only they are in the optimizer state, the EMA and the checkpoints. The base UNet goes to the step in
``frozen["lora_base"]`` (in ``lora.base_dtype``), the base text encoder is the frozen one the conditioner already
holds (``text_encoder.trainable`` must be False). A checkpoint's metadata points at the base (``init_from`` and its
step); a run whose base has moved on since is refused rather than silently paired with other weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from absl import logging

from ldm_jax import config_lib, storage
from ldm_jax.data import latent_cache
from ldm_jax.models import lora
from ldm_jax.training import checkpoint, transfer


def validate(config, text_conditioned: bool) -> None:
    """The rules a LoRA run adds (before any weights load)."""
    cfg = lora.from_run_config(config)
    if not cfg.enabled:
        return
    config_lib.check(bool(config.init_from), "init_from", config.init_from,
                     f"lora.rank={cfg.rank}: adapters train on the weights of a trained or converted run; set "
                     "init_from to it")  # fmt: skip
    if "text" in cfg.components:
        config_lib.check(text_conditioned, "lora.targets", tuple(cfg.targets),
                         f"'text_attention' needs a text-conditioned run; task={config.task!r} has no text encoder")  # fmt: skip
    if text_conditioned:
        config_lib.check(not config.text_encoder.trainable, "text_encoder.trainable", config.text_encoder.trainable,
                         "must be False in a LoRA run (the base text encoder is frozen; adapt it with "
                         "lora.targets including 'text_attention')")  # fmt: skip


class LoraAdapters:
    """The LoRA part of a ``LatentDiffusionTask`` whose config enables ``lora`` (see the module docstring)."""

    def __init__(self, config, cfg: lora.LoraConfig, base_abstract):
        self.config = config
        self.cfg = cfg
        # The model's parameter tree as ShapeDtypeStructs ({"unet", "text"}): what the adapters attach to.
        self.base_abstract = base_abstract
        self.base_dtype = jnp.dtype(cfg.base_dtype)

    def init(self, rng: jax.Array) -> dict:
        return lora.init_adapters(rng, self.base_abstract, self.cfg)

    def setup(self, frozen: dict, meta: dict) -> dict:
        """Puts the base UNet into ``frozen["lora_base"]``; returns the metadata that points at it."""
        source = storage.absolute(self.config.init_from)
        params, _, step = checkpoint.load_trained_params(source, "ema")
        recorded = meta.get("lora_base")
        if recorded and int(recorded["step"]) != step:
            raise ValueError(
                f"init_from={self.config.init_from!r}: its latest checkpoint is step {step}, but this run's adapters "
                f"were trained on step {recorded['step']}; adapters only fit the weights they were trained on "
                "(train a new run, or restore that checkpoint of the base)"
            )
        # The weights themselves, not their path or step: init_from may change on resume (a moved base), and two
        # bases at the same step (two converted checkpoints are both step 0) are not the same base.
        fingerprint = latent_cache.fingerprint(params)
        if recorded and recorded.get("fingerprint", fingerprint) != fingerprint:
            raise ValueError(
                f"init_from={self.config.init_from!r}: holds other weights than the base this run's adapters were "
                f"trained on ({recorded['workdir']} at step {recorded['step']}); adapters only fit the weights they "
                "were trained on (resume with that init_from, or train a new run)"
            )
        # The UNet and the conditioner's other trained parts (a class-conditional run's class-token table); a
        # trainable text encoder is the frozen one the conditioner holds.
        parts = [k for k in self.base_abstract if k != "text"]
        for part in parts:
            want = jax.tree.map(lambda x: tuple(x.shape), self.base_abstract[part])
            got = jax.tree.map(lambda x: tuple(x.shape), params.get(part))
            if want != got:
                what = "UNet does" if part == "unet" else f"{part!r} weights do"
                raise ValueError(
                    f"init_from={self.config.init_from!r}: its {what} not fit this config's model; use the model "
                    "fields of its config.json"
                )
        frozen["lora_base"] = {part: lora.cast_tree(params[part], self.base_dtype) for part in parts}
        if "text" in frozen:
            frozen["text"] = lora.cast_tree(frozen["text"], self.base_dtype)
        logging.info(
            "LoRA rank %d on %s of %s step %d: %d adapter parameters",
            self.cfg.rank, ",".join(self.cfg.targets), source, step, lora.count(self.init(jax.random.key(0))),
        )  # fmt: skip
        return {"lora_base": {"workdir": source, "step": step, "fingerprint": fingerprint}}

    def model(self, adapters, frozen, scale=1.0) -> tuple[dict, dict]:
        """(params, frozen) of the adapted model: what the task's functions take in a run without adapters."""
        s = scale * self.cfg.scale
        base = frozen["lora_base"]
        params = dict(base, unet=lora.merge(base["unet"], adapters["unet"], s) if "unet" in adapters else base["unet"])
        frozen = {k: v for k, v in frozen.items() if k != "lora_base"}
        if "text" in adapters:
            frozen["text"] = lora.merge(frozen["text"], adapters["text"], s)
        return params, frozen


def apply_files(
    params: dict, frozen: dict, files: Sequence[tuple[str, float]], allow_pickle: bool = False
) -> tuple[dict, dict, list[dict]]:
    """``params``/``frozen`` of a loaded model with the LoRA files ``[(path, scale)]`` merged in (diffusers/PEFT or
    kohya naming, ``models/lora.py``); also what each file adapted. The merge runs as one jitted program whose
    scale is an argument, and its outputs are weights of the same shapes as before: the generation programs compiled
    for the model are reused, whatever the scales."""
    from ldm_jax.interop.weight_files import read_state_dict

    text_in_params = "text" in params
    model = {"unet": params["unet"]}
    text = params.get("text", frozen.get("text"))
    if text is not None:
        model["text"] = text
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model)
    combined, described = {}, []
    for path, scale in files:
        state_dict = read_state_dict(path, allow_pickle, what="LoRA file")
        adapters, naming = lora.adapters_from_state_dict(state_dict, abstract, f"--lora={path}")
        combined = lora.combine(combined, lora.fold_scale(adapters, scale))
        described.append(
            dict(path=path, scale=scale, naming=naming, modules={c: _count_modules(adapters, c) for c in adapters})
        )
    # The weights are on a mesh (maybe over several processes): the adapters join them with the same sharding.
    sharding = jax.tree.leaves(model)[0].sharding
    combined = transfer.to_mesh(combined, sharding)
    merged = jax.jit(lora.merge)(model, combined, transfer.to_mesh(jnp.float32(1.0), sharding))
    params = dict(params, unet=merged["unet"])
    frozen = dict(frozen)
    if "text" in merged:
        if text_in_params:
            params["text"] = merged["text"]
        else:
            frozen["text"] = merged["text"]
    return params, frozen, described


def _count_modules(adapters: dict, component: str) -> int:
    return sum(1 for p in lora.flatten(adapters[component]) if p[-1] == "lora_a")
