"""Orbax checkpoints of a run: train state and JSON metadata, saved together.

Layout: ``<workdir>/checkpoints/<step>/{state,meta}``. The data position needs no item of its own: it is the step
(``data/pipeline.py``). Every process takes part in a save (each writes the shards it holds); saves are
asynchronous, and Orbax writes each step into a temporary directory and renames it when complete, so a save
interrupted by ``kill -9`` never leaves a checkpoint that restores. A state restores onto any mesh: the target
shardings come from the restoring run.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        _inject_fault("during_save", step)
        return saved

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores onto the shardings carried by ``abstract_state`` (a tree of ``jax.ShapeDtypeStruct``)."""
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], out["meta"]

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _inject_fault(where: str, step: int) -> None:
    """Fault injection for the crash tests: ``LDM_JAX_KILL_AT=during_save:<step>`` sends this process SIGKILL right
    after the asynchronous save of ``step`` has started (its files half-written), as a preemption without notice
    would. Unset in normal runs."""
    spec = os.environ.get("LDM_JAX_KILL_AT", "")
    if spec and spec == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_trained_params(workdir: str, which: str = "ema", sharding=None) -> tuple[Any, dict, int]:
    """Parameters of the latest checkpoint of another run: ``(params, meta, step)``.

    ``which`` is "ema" or "params" (a checkpoint without EMA weights, such as an imported one, gives its params for
    both). The tree is restored with the shapes recorded in the checkpoint onto
    ``sharding`` (default: the first local device), whatever device count wrote it.
    """
    if which not in ("ema", "params"):
        raise ValueError(f"which={which!r}: must be 'ema' or 'params'")
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir}: no checkpoints/ folder; train that run first")
    # The PyTree handler reads StandardSave's files and, unlike the Standard one, restores a subtree.
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={
            "state": ocp.PyTreeCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    )
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir}: no finished checkpoint in {directory}")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    key = "ema_params" if which == "ema" else "params"
    state_meta = manager.item_metadata(step)["state"]
    if key not in state_meta and "params" in state_meta:
        # Imported weights (ldm_jax.convert) are stored once, as "params": there is no separate EMA.
        key = "params"
    meta_tree = state_meta[key]
    # Partial restore: only the requested subtree is read, not the optimizer state.
    target = {key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), meta_tree)}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=sharding), target)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True),
            meta=ocp.args.JsonRestore(),
        ),
    )
    manager.close()
    return restored["state"][key], restored["meta"], step


def load_trained_meta(workdir: str) -> tuple[dict, int]:
    """(metadata, step) of the latest checkpoint of another run, without reading its arrays."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir}: no checkpoints/ folder; train that run first")
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={"meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    )
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir}: no finished checkpoint in {directory}")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    manager.close()
    return meta, step
