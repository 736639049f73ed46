"""Orbax checkpoints of a run: train state and JSON metadata, saved together.

Layout: ``<workdir>/checkpoints/<step>/{state,meta}``. The data position needs no item of its own: it is the step
(``data/pipeline.py``). Every process takes part in a save (each writes the shards it holds); saves are
asynchronous, and Orbax writes each step into a temporary directory and renames it when complete, so a save
interrupted by ``kill -9`` never leaves a checkpoint that restores. A state restores onto any mesh: the target
shardings come from the restoring run.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from ldm_jax import storage
from ldm_jax.training import checksums
from ldm_jax.training.distributed import barrier


ON_CORRUPT = ("fallback", "fail")
CHECKSUMS = "checksums"  # the meta key of the state's per-leaf checksums


class CheckpointTreeMismatch(ValueError):
    """A checkpoint whose arrays do not fit the run's model (a config error, not damage: nothing is moved)."""


class CheckpointSaveFailed(RuntimeError):
    """A checkpoint could not be written (disk full, permissions): names the folder; earlier ones are intact."""


class CheckpointUnreadable(RuntimeError):
    """No checkpoint of the run restores (or the one asked for does not), after the fallbacks allowed."""


def _path_name(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return ".".join(parts)


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}" + ("..." if len(text) > limit else "")


# Failures of the machine, not of the files: an older checkpoint restoring after one of these would only mean the
# machine recovered in between, and moving the newer one aside as damaged would drop good progress.
_MACHINE_ERRNOS = {errno.ENOMEM, errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENFILE}
_MACHINE_MESSAGES = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "Permission denied", "Too many open files")


def machine_failure(e: BaseException) -> bool:
    """Whether ``e`` (or an exception it was raised from) says the machine failed: memory, permissions, file
    handles. Orbax and tensorstore often re-raise these under their own types, so their messages count too."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (MemoryError, PermissionError)) or (isinstance(e, OSError) and e.errno in _MACHINE_ERRNOS):
            return True
        if any(m in str(e) for m in _MACHINE_MESSAGES):
            return True
        e = e.__cause__ or e.__context__
    return False


RESTORED, FILES_FAILED, MACHINE_FAILED = 0, 1, 2  # a restore's verdict on one process, in order of severity


def _worst_verdict(verdict: int) -> int:
    """The largest of every process's ``verdict``: a checkpoint counts as restored only where every process read
    it, and as the machine's failure where any process's machine failed."""
    if jax.process_count() == 1:
        return verdict
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(verdict))))


@functools.cache  # once per process; on first use, not at import, when the backend is known
def _use_whole_array_writes_on_cpu() -> None:
    """On the CPU backend, each replicated array is written whole by its first replica.

    Orbax's default (replica-parallel saving) splits a replicated array into one slice per replica so that every
    device copies a part to the host. On CPU the devices share the host's memory, so the split saves no copy, and
    each slice is its own ``jit(slice)`` program per array shape and device: about 300 compiles (7 s) at the first
    save of a tiny run on 8 devices, paid again by every new process. Other backends keep Orbax's default.
    """
    if jax.default_backend() != "cpu":
        return
    # The metadata store Orbax's own default handler is built with (no public name for it in orbax 0.12).
    from orbax.checkpoint._src.metadata import array_metadata_store

    handler = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=False, array_metadata_store=array_metadata_store.Store()
    )
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int, async_save: bool = True, keep_every: int = 0):
        _use_whole_array_writes_on_cpu()
        self.directory = storage.join(storage.absolute(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                # Steps divisible by keep_every are kept beyond the last max_to_keep (a long run's history).
                keep_period=keep_every or None,
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def check_tree(self, step: int, abstract_state: Any) -> None:
        """Raises ``CheckpointTreeMismatch`` naming the first parameter whose presence or shape differs between
        checkpoint ``step`` and ``abstract_state`` (the run's config)."""
        stored = self.manager.item_metadata(step)["state"]
        have = {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(stored)[0]}
        want = {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
        for name, shape in want.items():
            if name not in have:
                problem = f"{name} {shape} is not in the checkpoint"
            elif have[name] != shape:
                problem = f"{name} is {have[name]} in the checkpoint and {shape} in this config"
            else:
                continue
            break
        else:
            extra = sorted(set(have) - set(want))
            if not extra:
                return
            problem = f"{extra[0]} {have[extra[0]]} is in the checkpoint but not in this config"
        raise CheckpointTreeMismatch(
            f"{self.directory}/{step}: the checkpoint does not fit this run's model: {problem}. The config differs "
            "from the one that wrote it (compare config.json): restore with that config, or train in a new workdir"
        )

    def _move_aside(self, step: int, why: str) -> str:
        """Renames ``<step>`` to ``<step>.<why>-<time>`` (process 0), never deleting it; every process waits."""
        target = f"{self.directory}/{step}.{why}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            storage.rename(f"{self.directory}/{step}", target)
        barrier(f"checkpoint_move_{step}")
        self.manager.reload()
        return target

    def restore_latest(self, abstract_state: Any, restore_step: int = -1, on_corrupt: str = "fallback"):
        """``(state, meta, step, report)`` of the checkpoint to resume from: ``restore_step`` if >= 0, else the
        newest one that restores on every process.

        A checkpoint that fails to restore (damaged or missing files) is reported in one paragraph (which step,
        why) and, with ``on_corrupt="fallback"``, moved aside to ``<step>.corrupt-<time>`` before the next older
        one is tried; ``"fail"`` raises ``CheckpointUnreadable`` instead. A checkpoint that does not fit the
        model raises ``CheckpointTreeMismatch`` and moves nothing. Restoring an older step on purpose moves the
        newer ones aside (``<step>.unused-<time>``), so that the run can save those steps again. ``report``: what
        was moved, for the run's log and metrics."""
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"train.on_corrupt_checkpoint={on_corrupt!r}: must be one of {ON_CORRUPT}")
        steps = self.all_steps()
        report = {"corrupt": [], "unused": [], "seconds": 0.0}
        t0 = time.perf_counter()
        if restore_step >= 0:
            if restore_step not in steps:
                raise CheckpointUnreadable(
                    f"train.restore_step={restore_step}: {self.directory} has no such checkpoint (it has {steps})"
                )
            candidates = [restore_step]
        else:
            candidates = steps[::-1]
        failed = []  # newer checkpoints that did not restore, moved aside only once an older one does
        for step in candidates:
            state = meta = None
            verdict = RESTORED
            try:
                self.check_tree(step, abstract_state)
                state, meta = self.restore(step, abstract_state)
                why = ""
            except CheckpointTreeMismatch:
                raise
            except Exception as e:  # orbax/tensorstore raise many types for damaged files; the reason is reported
                verdict, why = (MACHINE_FAILED if machine_failure(e) else FILES_FAILED), _first_line(e)
            verdict = _worst_verdict(verdict)
            if verdict == MACHINE_FAILED:
                raise CheckpointUnreadable(
                    f"checkpoint {self.directory}/{step} does not restore on this machine "
                    f"({why or 'on another process: memory, permissions or file handles'}): the files are not at "
                    "fault, so no checkpoint was moved aside and no older one was tried; free the memory or fix the "
                    "permissions and rerun the same command"
                )
            ok = verdict == RESTORED
            if ok and CHECKSUMS in meta:
                # Bytes flipped inside an array's data can restore without an error: the saved checksums catch
                # them (computed over the global arrays, so every process reaches the same verdict).
                mismatch = checksums.first_mismatch(state, meta[CHECKSUMS])
                if mismatch:
                    ok, why = False, f"its arrays differ from what was saved: {mismatch}"
            if ok:
                # The files were at fault, not the machine (memory, permissions, a storage outage): this older one
                # restores here. Only now are the newer ones moved aside, before the unused ones are counted.
                for bad in failed:
                    report["corrupt"].append(self._move_aside(bad, "corrupt"))
                for newer in [s for s in self.all_steps() if s > step]:
                    report["unused"].append(self._move_aside(newer, "unused"))
                    logging.warning(
                        "train.restore_step=%d: newer checkpoint moved aside to %s", step, report["unused"][-1]
                    )
                report["seconds"] = time.perf_counter() - t0
                return state, meta, step, report
            why = why or "another process could not read it"
            message = f"checkpoint {self.directory}/{step} does not restore ({why}). " + (
                "train.on_corrupt_checkpoint=fail: stopping; move it aside by hand or set the option to "
                "'fallback' to resume from the newest checkpoint that restores"
                if on_corrupt == "fail" or restore_step >= 0
                else "The next older checkpoint is tried; if one restores, this one is moved aside (kept, not deleted)."
            )
            if on_corrupt == "fail" or restore_step >= 0:
                raise CheckpointUnreadable(message)
            logging.error("%s", message)
            failed.append(step)
        # None restores: more likely the machine than every file at once. Nothing is moved, so that the same command
        # resumes from the newest once the cause is fixed (moving them all would have let it start from step 0).
        raise CheckpointUnreadable(
            f"{self.directory}: no checkpoint restores (tried {failed}; the reasons are logged above); none was "
            "moved aside. If the cause is not in the files (memory, permissions, storage), fix it and rerun the same "
            "command; if every checkpoint is damaged, start a new workdir or repair the files"
        )

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def save(self, step: int, state: Any, meta: dict, force: bool = False, checksum: bool = True) -> bool:
        """Starts saving ``step`` (asynchronously unless the run turned it off). A save that fails (disk full,
        permissions), now or while an earlier asynchronous one finishes, raises ``CheckpointSaveFailed`` naming the
        folder; Orbax writes into a temporary folder and renames it when complete, so the checkpoints before it
        stay intact. ``checksum``: the state's per-leaf checksums go into the meta (``training/checksums.py``; a
        collective over the global arrays), for ``restore_latest`` to check."""
        if checksum:
            meta = {**meta, CHECKSUMS: checksums.of_tree(state)}
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:
            raise self._save_failed(step, e) from e
        _inject_fault("during_save", step)
        return saved

    def _save_failed(self, step: int, e: BaseException) -> CheckpointSaveFailed:
        try:
            kept = self.all_steps()
        except Exception:  # the folder itself may be what failed
            kept = "unknown"
        return CheckpointSaveFailed(
            f"saving checkpoint {step} to {self.directory} failed ({_first_line(e)}); the run stopped. The "
            f"checkpoints already there ({kept}) are intact: free space or fix the folder's permissions, then rerun "
            "the same command to resume from the newest of them"
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores onto the shardings carried by ``abstract_state`` (a tree of ``jax.ShapeDtypeStruct``)."""
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], out["meta"]

    def newest_meta(self) -> dict:
        """The metadata of the newest checkpoint whose metadata reads ({} if none does); the state itself is
        checked by ``restore_latest``."""
        for step in self.all_steps()[::-1]:
            try:
                return self.restore_meta(step)
            except Exception:  # a damaged checkpoint: restore_latest reports it and falls back
                continue
        return {}

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(self.manager.latest_step() or -1, e) from e

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


def _read_only_latest(workdir: str, handlers: dict, field: str = "") -> tuple[ocp.CheckpointManager, int]:
    """A read-only manager of another run's checkpoints (its "meta" item and ``handlers``) and its latest step; the
    errors name ``field`` (the config field or flag that gave ``workdir``) when given."""
    name = f"{field}={workdir!r}" if field else workdir
    directory = storage.join(storage.absolute(workdir), "checkpoints")
    if not storage.isdir(directory):
        raise FileNotFoundError(f"{name}: no checkpoints/ folder; train that run first")
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={**handlers, "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    )
    step = manager.latest_step()
    if step is None:
        manager.close()
        raise FileNotFoundError(f"{name}: no finished checkpoint in {directory}")
    return manager, step


def latest_finished_step(workdir: str, field: str = "") -> int:
    """The step of another run's latest finished checkpoint; FileNotFoundError naming ``field`` when it has none."""
    manager, step = _read_only_latest(workdir, {}, field)
    manager.close()
    return step


def has_finished_checkpoint(workdir: str) -> bool:
    try:
        latest_finished_step(workdir)
    except FileNotFoundError:
        return False
    return True


def load_trained_params(workdir: str, which: str = "ema", sharding=None) -> tuple[Any, dict, int]:
    """Parameters of the latest checkpoint of another run: ``(params, meta, step)``.

    ``which`` is "ema" or "params" (a checkpoint without EMA weights, such as an imported one, gives its params for
    both). The tree is restored with the shapes recorded in the checkpoint onto
    ``sharding`` (default: the first local device), whatever device count wrote it.
    """
    if which not in ("ema", "params"):
        raise ValueError(f"which={which!r}: must be 'ema' or 'params'")
    # The PyTree handler reads StandardSave's files and, unlike the Standard one, restores a subtree.
    manager, step = _read_only_latest(workdir, {"state": ocp.PyTreeCheckpointHandler()})
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
    manager, step = _read_only_latest(workdir, {})
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    manager.close()
    return meta, step
