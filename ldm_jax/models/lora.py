"""LoRA adapters (Hu et al. 2021) on the kernels of a parameter tree, and their files.

An adapter replaces a kernel ``W [in, out]`` by ``W + s * A @ B`` with ``A [in, r]``, ``B [r, out]`` and
``s = scale * alpha / r``; ``B`` starts at zero, so an untrained adapter is the base model exactly. Adapters are a
tree of their own that mirrors the base tree down to the adapted module (``{"unet": {..., "to_q": {"lora_a": A,
"lora_b": B}}}``): only that tree is trained and in the optimizer state; the base weights stay frozen.

The adapted model is the base with each adapted kernel replaced by the merged sum (``merge``). Merging is cheap (one
[in, r] x [r, out] product per kernel) and keeps every model's apply function unchanged, so the training step, every
sampler and the exporters see an ordinary parameter tree; a 1x1 convolution kernel (HWIO [1, 1, in, out], the
projections of SD-1's transformers) takes an adapter like a dense one.

Files: ``adapter_state_dict`` writes the diffusers/PEFT layout that ``StableDiffusionPipeline.load_lora_weights``
reads (``unet.<module>.lora_A.weight`` [r, in], ``lora_B.weight`` [out, r], ``text_encoder.<module>...``; ``s`` folded
into B so that no alpha is needed); ``adapters_from_state_dict`` reads that layout and kohya's
(``lora_unet_<module with _>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``, ``lora_te_...``), strictly.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import config_lib
from ldm_jax.interop.state_dict import flatten, torch_key, unflatten

# Target name -> (component of the parameter tree, module paths it adapts: a regex on the "/"-joined path).
TARGETS = {
    "unet_attention": ("unet", re.compile(r"(^|/)attn[12]/(to_q|to_k|to_v|to_out_0)$")),
    "unet_feed_forward": ("unet", re.compile(r"(^|/)ff/(proj_in|proj_out)$")),
    "text_attention": ("text", re.compile(r"^layers_\d+/(q_proj|k_proj|v_proj|out_proj)$")),
}
COMPONENTS = ("unet", "text")
# The state-dict naming of each component (``interop.state_dict``) and its prefix in diffusers/PEFT and kohya files.
_KIND = {"unet": "unet", "text": "clip"}
_PEFT_PREFIX = {"unet": "unet.", "text": "text_encoder."}
_KOHYA_PREFIX = {"unet": "lora_unet_", "text": "lora_te_"}
BASE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig(config_lib.Section):
    """``config.lora``: train low-rank adapters on the ``init_from`` weights instead of the weights themselves."""

    rank: int = 0  # 0: off (the run trains its parameters)
    alpha: float = 0.0  # the adapters' scale is alpha / rank; 0: alpha = rank
    targets: tuple = ("unet_attention",)  # of TARGETS
    base_dtype: str = "float32"  # "bfloat16": the frozen base weights held in bfloat16 (half the memory)

    def validate(self, prefix: str) -> None:
        self.check(self.rank >= 0, prefix, "rank", "must be >= 0 (0 = no adapters)")
        self.check(self.alpha >= 0, prefix, "alpha", "must be >= 0 (0 = rank)")
        self.check(len(self.targets) > 0, prefix, "targets", f"must name at least one of {tuple(TARGETS)}")
        for t in self.targets:
            self.check(t in TARGETS, prefix, "targets", f"{t!r} is not one of {tuple(TARGETS)}")
        self.check(self.base_dtype in BASE_DTYPES, prefix, "base_dtype", f"must be one of {BASE_DTYPES}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        """alpha / rank: the factor between the adapters' product and the kernel update."""
        return (self.alpha or self.rank) / self.rank

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if any(TARGETS[t][0] == c for t in self.targets))


def lora_section(**overrides):
    return LoraConfig.defaults(**overrides)


def from_run_config(config) -> LoraConfig:
    """The run's ``lora`` section, or LoRA off for runs (and configs) without one."""
    section = config.get("lora") if hasattr(config, "get") else None
    return LoraConfig() if section is None else LoraConfig.from_config(section, "lora.")


def _adaptable(leaf) -> bool:
    """Dense kernels [in, out] and 1x1 convolution kernels [1, 1, in, out]."""
    shape = tuple(leaf.shape)
    return len(shape) == 2 or (len(shape) == 4 and shape[:2] == (1, 1))


def target_modules(params: Mapping, targets) -> list[tuple[str, tuple]]:
    """(component, module path) of every kernel ``targets`` adapt in ``params`` ({"unet": ..., "text": ...})."""
    out = []
    for component in COMPONENTS:
        if component not in params:
            continue
        patterns = [TARGETS[t][1] for t in targets if TARGETS[t][0] == component]
        for path, leaf in flatten(params[component]).items():
            if path[-1] == "kernel" and _adaptable(leaf) and any(p.search("/".join(path[:-1])) for p in patterns):
                out.append((component, path[:-1]))
    return out


def init_adapters(rng: jax.Array, params: Mapping, cfg: LoraConfig) -> dict:
    """Adapters for ``cfg.targets`` on ``params`` (arrays or ShapeDtypeStructs): A uniform in +-1/sqrt(in) (PEFT's
    default, kaiming-uniform with a = sqrt(5)), B zero; float32."""
    modules = target_modules(params, cfg.targets)
    missing = [c for c in cfg.components if not any(m[0] == c for m in modules)]
    if missing:
        raise ValueError(
            f"lora.targets={tuple(cfg.targets)}: the model has no {missing} modules they adapt "
            f"(its parameters: {sorted(params)})"
        )
    flat = {}
    for i, (component, path) in enumerate(modules):
        kernel = _lookup(params[component], path)["kernel"]
        d_in, d_out = kernel.shape[-2], kernel.shape[-1]
        bound = 1.0 / np.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (d_in, cfg.rank), jnp.float32, -bound, bound)
        flat[(component,) + path + ("lora_a",)] = a
        flat[(component,) + path + ("lora_b",)] = jnp.zeros((cfg.rank, d_out), jnp.float32)
    return unflatten(flat)


def _lookup(tree: Mapping, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def merge(base: Mapping, adapters: Mapping, scale) -> dict:
    """``base`` with every adapted kernel replaced by ``kernel + scale * A @ B`` (float32); other leaves as they are.

    ``scale`` may be traced. Works on any subtree pair (the whole {"unet", "text"} tree or one component)."""
    if "lora_a" in adapters:
        kernel = base["kernel"]
        delta = jnp.matmul(adapters["lora_a"].astype(jnp.float32), adapters["lora_b"].astype(jnp.float32)) * scale
        return {**base, "kernel": kernel.astype(jnp.float32) + delta.reshape(kernel.shape)}
    out = dict(base)
    for key, sub in adapters.items():
        if key not in base:
            raise ValueError(f"adapter for {key!r}: the base model has no such module (it has {sorted(base)[:12]})")
        out[key] = merge(base[key], sub, scale)
    return out


def combine(first: Mapping, second: Mapping) -> dict:
    """Two adapter trees as one whose merge is the sum of both merges (rank-concatenated where both adapt a module;
    each tree's own scale must already be folded into its B)."""
    fa, fb = flatten(first), flatten(second)
    out = dict(fa)
    for path, value in fb.items():
        if path not in out:
            out[path] = value
        elif path[-1] == "lora_a":
            out[path] = np.concatenate([np.asarray(out[path]), np.asarray(value)], axis=1)
        else:
            out[path] = np.concatenate([np.asarray(out[path]), np.asarray(value)], axis=0)
    return unflatten(out)


def fold_scale(adapters: Mapping, scale: float) -> dict:
    """The same adapters with ``scale`` multiplied into every B (so that ``merge(..., 1)`` applies them)."""
    return unflatten(
        {p: (np.asarray(v, np.float32) * scale if p[-1] == "lora_b" else v) for p, v in flatten(adapters).items()}
    )


def count(adapters: Mapping) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapters)))


def _module_name(component: str, path: tuple) -> str:
    """The PyTorch module name (diffusers / transformers) of the module at ``path``."""
    return torch_key(_KIND[component], path + ("kernel",))[: -len(".weight")]


# ---- files ------------------------------------------------------------------------------------------------------
def adapter_state_dict(adapters: Mapping, scale: float) -> dict[str, np.ndarray]:
    """Adapters -> the diffusers/PEFT LoRA state dict (``scale`` folded into lora_B; float32)."""
    out = {}
    for path, a in flatten(adapters).items():
        if path[-1] != "lora_a":
            continue
        component, module = path[0], path[1:-1]
        b = np.asarray(_lookup(adapters, path[:-1] + ("lora_b",)), np.float32) * scale
        name = _PEFT_PREFIX[component] + _module_name(component, module)
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(a, np.float32).T)  # [r, in]
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.T)  # [out, r]
    return out


class AdapterFileError(ValueError):
    """A LoRA file that does not fit the model: names the file, the keys and what is allowed."""


def _module_tables(params: Mapping) -> dict[str, tuple[str, tuple]]:
    """Every name a module with an adaptable kernel has in a diffusers/PEFT or kohya file -> (component, path)."""
    table = {}
    for component in COMPONENTS:
        if component not in params:
            continue
        for path, leaf in flatten(params[component]).items():
            if path[-1] != "kernel" or not _adaptable(leaf):
                continue
            name = _module_name(component, path[:-1])
            table[_PEFT_PREFIX[component] + name] = (component, path[:-1])
            table[_KOHYA_PREFIX[component] + name.replace(".", "_")] = (component, path[:-1])
    return table


_PEFT_KEY = re.compile(r"^(.+)\.lora_([AB])\.(?:default\.)?weight$")
_KOHYA_KEY = re.compile(r"^(lora_(?:unet|te)_[^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def adapters_from_state_dict(state_dict: Mapping[str, np.ndarray], params: Mapping, what: str) -> tuple[dict, str]:
    """A diffusers/PEFT or kohya LoRA state dict -> (adapters with each module's alpha / rank folded into B, the
    naming found). ``params``: the model's tree ({"unet": ..., "text": ...}), to name and shape-check every module.
    Keys of neither naming, modules the model does not have, and shapes that do not fit raise
    ``AdapterFileError``."""
    table = _module_tables(params)
    modules: dict[str, dict[str, np.ndarray]] = {}
    unknown = []
    naming = set()
    for key, value in state_dict.items():
        m = _PEFT_KEY.match(key)
        if m:
            modules.setdefault(m.group(1), {})["down" if m.group(2) == "A" else "up"] = np.asarray(value)
            naming.add("diffusers/PEFT")
            continue
        m = _KOHYA_KEY.match(key)
        if m:
            part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m.group(2)]
            modules.setdefault(m.group(1), {})[part] = np.asarray(value)
            naming.add("kohya")
            continue
        unknown.append(key)
    if unknown:
        raise AdapterFileError(
            f"{what}: {len(unknown)} keys are neither diffusers/PEFT LoRA (<prefix>.<module>.lora_A.weight / "
            f"lora_B.weight) nor kohya (lora_unet_<module>.lora_down.weight / lora_up.weight / alpha): "
            f"{', '.join(sorted(unknown)[:8])}; LoCon/LoHa/DoRA adapters are not supported"
        )
    if not modules:
        raise AdapterFileError(f"{what}: holds no LoRA weights")
    not_in_model = sorted(n for n in modules if n not in table)
    if not_in_model:
        raise AdapterFileError(
            f"{what}: {len(not_in_model)} adapted modules are not in this model: {', '.join(not_in_model[:8])} "
            f"(the model's modules look like {next(iter(table), '?')})"
        )
    flat = {}
    for name, parts in modules.items():
        component, path = table[name]
        if "down" not in parts or "up" not in parts:
            raise AdapterFileError(f"{what}: module {name} has {sorted(parts)}, needs both the down (A) and up (B)")
        down, up = parts["down"], parts["up"]
        if down.ndim == 4:
            if down.shape[2:] != (1, 1) or up.shape[2:] != (1, 1):
                raise AdapterFileError(f"{what}: {name}: only 1x1 convolution adapters are supported, got {down.shape}")
            down, up = down[:, :, 0, 0], up[:, :, 0, 0]
        kernel = _lookup(params[component], path)["kernel"]
        rank = down.shape[0]
        if down.shape != (rank, kernel.shape[-2]) or up.shape != (kernel.shape[-1], rank):
            raise AdapterFileError(
                f"{what}: {name}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit its kernel "
                f"[in {kernel.shape[-2]}, out {kernel.shape[-1]}] (expected [r, in] and [out, r])"
            )
        alpha = float(np.asarray(parts["alpha"]).reshape(())) if "alpha" in parts else float(rank)
        flat[(component,) + path + ("lora_a",)] = np.ascontiguousarray(down.T.astype(np.float32))
        flat[(component,) + path + ("lora_b",)] = np.ascontiguousarray(up.T.astype(np.float32)) * (alpha / rank)
    return unflatten(flat), " + ".join(sorted(naming))


def parse_lora_flag(value: str) -> tuple[str, float]:
    """``path[:scale]`` -> (path, scale); the scale defaults to 1."""
    path, sep, scale = value.rpartition(":")
    if sep and path and re.fullmatch(r"[-+]?\d*\.?\d+(e[-+]?\d+)?", scale):
        return path, float(scale)
    return value, 1.0


def cast_tree(tree: Any, dtype) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
