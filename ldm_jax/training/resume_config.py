"""A run that resumes under another config: which fields may change, and the check that refuses the others.

A workdir's ``config.json`` is the config its checkpoints were trained with. Resuming with a config that differs in
what the steps compute (the model, the data, the batch, the optimizer, the diffusion process, the seed) would go on
training a different recipe from the old run's weights, and overwrite ``config.json`` with the new one: the result
matches neither config and nothing records it. So ``check`` refuses such a resume, naming every changed field with
its old and new value, unless the caller allows it (``ldm_jax.train --allow_config_change``). Then, and whenever
only the fields below changed, the previous config is kept as ``config.before_step<N>.json`` before the new one is
written.

Fields that may change without asking: how long the run goes and how often it logs, previews, checkpoints and keeps
them (``train.*`` below; ``train.num_steps`` not under a cosine schedule, which decays over it), where the embedded datasets are kept and how fast the data is read (``data.data_dir``,
the reader's threads and buffers), previews' and in-training evaluation's settings (``sample``, ``eval``), the mesh
(a checkpoint restores onto any mesh) and ``init_from`` (read only by a run that starts from scratch). Not
``first_stage.workdir``: another first stage would encode other latents under the same UNet (a moved first stage
resumes with ``--allow_config_change``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any

from absl import logging

from ldm_jax import config_lib, storage

# Dotted field names, or section names (every field of the section), that may differ from the saved config.
MAY_CHANGE = (
    "train.num_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.preview_every",
    "train.keep_checkpoints",
    "train.keep_every",
    "train.restore_step",
    "train.on_corrupt_checkpoint",
    "train.async_checkpointing",
    "train.checkpoint_checksums",
    "train.max_nonfinite_streak",
    "train.compilation_cache_dir",
    "train.record_data_order",
    "train.profile_steps",
    "train.profile_skip_steps",
    "data.data_dir",
    "data.worker_count",
    "data.read_threads",
    "data.prefetch_buffer_size",
    "data.max_bad_fraction",
    "data.eval_source",
    "init_from",
    "sample",
    "eval",
    "mesh",
)


def may_change(field: str) -> bool:
    return any(field == name or field.startswith(name + ".") for name in MAY_CHANGE)


def _why_not(field: str, saved: dict, current: dict) -> str | None:
    """Why a field that may change may not change between these two configs (None: it may)."""
    schedules = {c.get("optim", {}).get("schedule") for c in (saved, current)}
    if field == "train.num_steps" and "cosine" in schedules:
        # The cosine decay runs over train.num_steps: another length bends the rest of the curve (resuming a
        # 1500-step run to 3000 would jump from the final rate back to about half the peak).
        return "the cosine schedule decays over train.num_steps"
    return None


def changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, current value)`` for every field that both configs hold and that differs, sorted.
    A field only one of them holds comes from another version of the code (a field added or removed since the run
    was saved), not from the user: it is not a change."""
    found = config_lib.differences(saved, current)
    return [(name, old, new) for name, old, new in found if dataclasses.MISSING not in (old, new)]


def history_path(workdir: str, step: int) -> str:
    """Where the config that trained a workdir up to ``step`` is kept: a second resume at the same step (a run
    that stopped again before its next checkpoint) takes the next free ``.<k>`` name, so no earlier one is lost."""
    numbered = (storage.join(workdir, f"config.before_step{step}.{k}.json") for k in itertools.count(1))
    return storage.first_free(itertools.chain([storage.join(workdir, f"config.before_step{step}.json")], numbered))


def check(config, workdir: str, step: int, allow_change: bool) -> list[tuple[str, Any, Any]]:
    """Compares ``config`` with the config of the run in ``workdir`` (newest checkpoint ``step``) before it
    resumes. Raises ``config_lib.ConfigError`` naming every changed field that may not change, unless
    ``allow_change``; returns all the changes (``changes``). A workdir without ``config.json`` passes (nothing to
    compare with)."""
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        logging.warning("%s: no config.json beside the checkpoints; resuming without comparing configs", workdir)
        return []
    saved = json.loads(storage.read_text(path))
    current = json.loads(config.to_json_best_effort(sort_keys=True))
    found = changes(saved, current)
    why = {name: _why_not(name, saved, current) for name, _, _ in found}
    refused = [c for c in found if not may_change(c[0]) or why[c[0]]]
    if refused and not allow_change:
        listed = "; ".join(
            f"{name} {json.dumps(old)} -> {json.dumps(new)}" + (f" ({why[name]})" if why[name] else "")
            for name, old, new in refused
        )
        raise config_lib.ConfigError(
            f"--workdir={workdir}: holds a run trained to step {step} with another config ({len(refused)} "
            f"field(s) differ from its config.json: {listed}). Resuming would train the new recipe on from the old "
            "run's weights. Train in a new --workdir (or delete this one), restore those values, or pass "
            "--allow_config_change to resume under the new config (the old one is kept as "
            f"{history_path(workdir, step)})"
        )
    for name, old, new in found:
        logging.warning("resuming with %s %s -> %s (was %s)", name, json.dumps(old), json.dumps(new), path)
    return found


def keep_previous(workdir: str, step: int, found: list) -> None:
    """Copies the workdir's ``config.json`` to ``history_path`` before a changed config replaces it (process 0)."""
    if found:
        path = storage.join(workdir, "config.json")
        storage.write_text(history_path(workdir, step), storage.read_text(path))
