"""The machinery every config shares: sections, presets, reading and writing.

A config is an ``ml_collections.ConfigDict`` (so ``--config.optim.lr=...`` works on the command line) made of
sections. Each section is declared next to the code that reads it as a frozen dataclass subclassing ``Section``
(``OptimConfig`` in ``training/optim.py``, ``UNetConfig`` in ``models/unet.py``, ...): its fields and defaults are
the section's keys, ``Section.defaults`` makes the ConfigDict a config file starts from, and
``Section.from_config`` reads one back, refuses missing and unknown keys and runs the section's own ``validate``,
which raises ``ValueError`` naming ``<section>.<field>``, its value and the rule. Rules that join sections (a batch
that the accumulation steps must divide, latents the UNet's levels must halve) belong to the task and are checked by
``ldm_jax.tasks.validate_config``. Presets live in the files under ``configs/``.

This module imports nothing from the package, so every module may import it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable

import ml_collections


class ConfigError(ValueError):
    """A config field (or flag) that breaks its rule: the message names the field, the value and the rule."""


@dataclasses.dataclass(frozen=True)
class Section:
    """A config section: a frozen dataclass whose fields are the section's keys (see the module docstring)."""

    @classmethod
    def defaults(cls, **overrides) -> ml_collections.ConfigDict:
        """The section as a ConfigDict: every field, at its default unless given in ``overrides``."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"{cls.__name__}: no fields {unknown}; it has {names}")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in overrides:
                values[f.name] = overrides[f.name]
            elif f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
            else:
                raise TypeError(f"{cls.__name__}.defaults: field {f.name!r} has no default; pass it")
        return ml_collections.ConfigDict(values)

    @classmethod
    def from_config(cls, section, prefix: str):
        """The section ``section`` (a ConfigDict or mapping) read and validated; ``prefix`` names it in errors
        ("optim." for ``config.optim``, "--" for flags)."""
        if section is None:
            raise ConfigError(f"{prefix.rstrip('.')}: missing section; the config must declare it")
        values = dict(section)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ConfigError(f"{prefix}{unknown[0]}: unknown field; {prefix.rstrip('.')} has {names}")
        missing = [n for n in names if n not in values]
        if missing:
            msg = f"{prefix}{missing[0]}: missing; the config must declare every field of {names}"
            default = {f.name: f.default for f in dataclasses.fields(cls)}[missing[0]]
            if default is not dataclasses.MISSING:
                # Usually a field added after the run was saved: name the value a fresh config would hold.
                value = json.dumps(default, default=str)
                msg += f" (a run saved before the field existed: add it to its config.json; default {value})"
            raise ConfigError(msg)
        obj = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        obj.validate(prefix)
        return obj

    def validate(self, prefix: str) -> None:
        """Raises ValueError naming the first bad field; sections override it."""

    def check(self, ok: bool, prefix: str, field: str, rule: str, value: Any = dataclasses.MISSING) -> None:
        if not ok:
            fail(f"{prefix}{field}", getattr(self, field) if value is dataclasses.MISSING else value, rule)


def fail(field: str, value, rule: str):
    raise ConfigError(f"{field}={value!r}: {rule}")


def check(ok: bool, field: str, value, rule: str) -> None:
    """For rules outside one section: raises ValueError naming ``field``, ``value`` and ``rule``."""
    if not ok:
        fail(field, value, rule)


def parse_preset(arg: str | None, presets: Iterable[str]) -> str:
    presets = tuple(presets)
    name = arg or presets[0]
    if name not in presets:
        raise ConfigError(
            f"config preset {name!r}: must be one of {presets} (as in --config=configs/x.py:{presets[0]})"
        )
    return name


def run_header(task: str, preset: str) -> ml_collections.ConfigDict:
    """The fields every run has, whatever it trains (``mesh`` and the sections are added by the config file)."""
    c = ml_collections.ConfigDict()
    c.task = task
    c.preset = preset
    c.seed = 0
    c.dtype = "float32"
    c.init_from = ""  # a workdir whose latest checkpoint initialises params when this workdir has none
    return c


def save_config(config, path: str) -> None:
    from ldm_jax import storage

    storage.write_text(path, config.to_json_best_effort(indent=2, sort_keys=True))


def differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted field, old value, new value)`` for every field whose value differs between two nested dicts (a
    config or a job record as JSON reads it back), sorted by name. A dict on both sides is compared field by field;
    a field only one side holds has ``dataclasses.MISSING`` on the other."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, dataclasses.MISSING), new.get(key, dataclasses.MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def load_config(path: str) -> ml_collections.ConfigDict:
    """Reads a config written by ``save_config`` (e.g. ``<workdir>/config.json``)."""
    from ldm_jax import storage

    if not storage.exists(path):
        raise FileNotFoundError(f"{path}: no config.json; is this a workdir written by ldm_jax.train?")
    return ml_collections.ConfigDict(json.loads(storage.read_text(path)))


def load_run_config(workdir: str, field: str) -> ml_collections.ConfigDict:
    """The ``config.json`` of the run in ``workdir``; a missing one is reported by ``field``, the config field or
    flag that named the run."""
    from ldm_jax import storage

    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"{field}={workdir!r}: no config.json; train that run first")
    return ml_collections.ConfigDict(json.loads(storage.read_text(path)))
