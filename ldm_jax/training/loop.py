"""The training loop shared by every task: mesh, sharded init or resume, one compiled step, logging, checkpoints.

It asks the task only what ``tasks.protocol.Task`` declares."""

from __future__ import annotations

import hashlib
import json
import signal
import time

import jax
import numpy as np
from absl import logging

from ldm_jax import config_lib, jax_setup, storage
from ldm_jax.data import pipeline, preprocess
from ldm_jax.imaging import save_png
from ldm_jax.tasks import build_task, validate_config
from ldm_jax.tasks import dreambooth
from ldm_jax.tasks.protocol import frozen_input_changes
from ldm_jax.training import checkpoint as ckpt_lib
from ldm_jax.training import resume_config, transfer
from ldm_jax.training.profiling import StepProfiler
from ldm_jax.training.reporting import MetricWriter, Progress
from ldm_jax.training.sharding import batch_sharding, check_batch_size, make_mesh, replicated, tree_shardings


def _log_compiled(compiled, seconds: float) -> None:
    logging.info("train step compiled in %.1f s", seconds)
    try:
        mem = compiled.memory_analysis()
    except Exception as e:  # some backends do not implement it; the run goes on without the numbers
        logging.info("memory analysis unavailable: %s", e)
        return
    if mem is not None:
        logging.info(
            "per-device memory: arguments %.1f MiB, outputs %.1f MiB, temporaries %.1f MiB, generated code %.1f MiB",
            mem.argument_size_in_bytes / 2**20,
            mem.output_size_in_bytes / 2**20,
            mem.temp_size_in_bytes / 2**20,
            mem.generated_code_size_in_bytes / 2**20,
        )


def _check_nonfinite(state, max_streak: int, step: int) -> None:
    """Stops the run when ``max_streak`` steps in a row had a non-finite loss or gradient (each was skipped)."""
    worst = int(transfer.to_host(state.nonfinite_max_streak))
    if worst >= max_streak:
        total = int(transfer.to_host(state.nonfinite_total))
        raise FloatingPointError(
            f"{worst} steps in a row had a non-finite loss or gradient (by step {step}; {total} skipped in all; "
            f"train.max_nonfinite_streak={max_streak}): the updates were skipped and the run stopped. Lower "
            "optim.lr, enable optim.grad_clip, or check the data; the last checkpoint holds the last good state."
        )


class _PreemptionFlag:
    """SIGTERM sets a flag that the loop reads between steps (single-process runs). Multi-process runs leave the
    signal to JAX's preemption sync manager, which Orbax's ``reached_preemption`` asks, so that every host stops
    at the same step."""

    def __init__(self):
        self.raised = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _DataOrderLog:
    """``train.record_data_order``: one line per step, {step, sha1 of this process's batch}, appended to
    ``<workdir>/data_order/process_<i>.jsonl``; a resumed run appends again, so re-run steps appear twice."""

    def __init__(self, workdir: str, enabled: bool):
        self._file = None
        if enabled:
            self._file = storage.AppendLog(storage.join(workdir, "data_order", f"process_{jax.process_index()}.jsonl"))

    def record(self, step: int, local_batch: dict) -> None:
        if self._file is not None:
            h = hashlib.sha1()
            for k in sorted(local_batch):
                h.update(k.encode())
                h.update(np.ascontiguousarray(local_batch[k]).tobytes())
            self._file.write(json.dumps({"step": step, "sha1": h.hexdigest()}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def make_train_step(config, task, mesh):
    """(init_state(rng), jitted step, state shardings, abstract state) for ``task`` on ``mesh``.

    The step is the task's (``Task.make_step``); the state is donated and stays sharded as ``tree_shardings``
    says, batches are split over every device.
    """
    init_state, step = task.make_step(config.train.num_steps)
    abstract = jax.eval_shape(init_state, jax.random.key(0))
    state_shardings = tree_shardings(abstract, mesh)
    repl = replicated(mesh)
    step_fn = jax.jit(
        step,
        in_shardings=(state_shardings, repl, batch_sharding(mesh), repl),
        out_shardings=(state_shardings, repl),
        donate_argnums=(0,),
    )
    return init_state, step_fn, state_shardings, abstract


def _match_init_params(src, target, source_name: str):
    """The part of ``src`` that this run trains (e.g. no "text" when the text encoder is frozen), checked to have
    exactly the target's structure and shapes, so a config that does not describe the source model fails here."""
    missing = [k for k in target if k not in src]
    if missing:
        raise ValueError(f"init_from={source_name!r}: has no {missing} parameters (it holds {sorted(src)})")
    src = {k: src[k] for k in target}
    flat_src = dict(jax.tree_util.tree_leaves_with_path(src))
    problems = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(target):
        got = flat_src.pop(path, None)
        name = jax.tree_util.keystr(path)
        if got is None:
            problems.append(f"{name} missing")
        elif tuple(got.shape) != tuple(leaf.shape):
            problems.append(f"{name} {tuple(got.shape)} vs {tuple(leaf.shape)} here")
    problems += [f"{jax.tree_util.keystr(p)} unexpected" for p in flat_src]
    if problems:
        raise ValueError(
            f"init_from={source_name!r}: its parameters do not fit this config's model ({len(problems)} differences: "
            + "; ".join(problems[:10])
            + "); use the same model fields as the source run (its config.json)"
        )
    return src


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False):
    """Trains ``config.task`` in ``workdir``, resuming from its latest checkpoint if there is one.

    A resume under a config that differs from the run's ``config.json`` in what the steps compute is refused, by
    field, unless ``allow_config_change`` (``training/resume_config.py``)."""
    storage.check(workdir, "--workdir")
    storage.check(config.init_from, "init_from")
    if "first_stage" in config:
        storage.check(config.first_stage.workdir, "first_stage.workdir")
    dreambooth.resolve(config)  # a DreamBooth run: its previews' prompts, the architecture of the model it tunes
    validate_config(config)
    train_cfg = config.train
    if train_cfg.compilation_cache_dir:
        # Every process compiles the same programs: a shared cache directory saves each later run the compile.
        jax_setup.use_compilation_cache(train_cfg.compilation_cache_dir, min_compile_time_secs=1.0)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    check_batch_size(config.data.global_batch_size, mesh)
    if train_cfg.grad_accum_steps > 1:
        check_batch_size(
            config.data.global_batch_size // train_cfg.grad_accum_steps,
            mesh,
            field=f"data.global_batch_size / train.grad_accum_steps = {config.data.global_batch_size} / "
            f"{train_cfg.grad_accum_steps}; a micro-batch",
        )
    logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    # A run started before a run it needs is told so by field before anything is written to its workdir: a latent
    # task's first stage without a checkpoint when the task is built (``LatentSpace``), an ``init_from`` without
    # one (the inpainting demo before the txt2img demo) here.
    task = build_task(config)
    if config.init_from and task.trains_from_init and not ckpt_lib.has_finished_checkpoint(workdir):
        ckpt_lib.latest_finished_step(config.init_from, "init_from")

    ckpt = ckpt_lib.Checkpointer(
        workdir, train_cfg.keep_checkpoints, train_cfg.async_checkpointing, train_cfg.keep_every
    )
    latest = ckpt.latest_step()
    if latest is None and train_cfg.restore_step >= 0:
        raise ValueError(f"train.restore_step={train_cfg.restore_step}: {ckpt.directory} holds no checkpoint")
    meta = ckpt.newest_meta() if latest is not None else {}
    # Every process compares before any of them restores, so none can have rewritten config.json yet.
    changed = resume_config.check(config, workdir, latest, allow_config_change) if latest is not None else []
    frozen, task_meta = task.setup(meta)
    moved = frozen_input_changes(meta, task_meta)
    if moved and not allow_config_change:
        # The config did not change, the weights behind a path did: a latent task would go on in another latent
        # space (every process read the same weights, so every process stops here alike).
        raise config_lib.ConfigError(
            f"--workdir={workdir}: {'; '.join(moved)}. Resume with those weights, or pass --allow_config_change to "
            "go on with these"
        )
    for line in moved:
        logging.warning("resuming with other frozen weights: %s", line)
    # Every process read the same frozen weights; each places its own replicas (no cross-host transfer).
    frozen = transfer.to_mesh(frozen, replicated(mesh))

    init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
    init_state, step_fn, state_shardings, abstract = make_train_step(config, task, mesh)

    restore_report = None
    if latest is not None:
        # Onto this run's mesh, whatever device count or mesh wrote the checkpoint; the newest that restores on
        # every process (train.on_corrupt_checkpoint), or train.restore_step.
        state, meta, restored, restore_report = ckpt.restore_latest(
            ckpt_lib.abstract_with_shardings(abstract, state_shardings),
            train_cfg.restore_step,
            train_cfg.on_corrupt_checkpoint,
        )
        logging.info("resuming from %s step %d", ckpt.directory, restored)
        if restore_report["corrupt"]:
            logging.error(
                "resumed from step %d instead of %d: %d damaged checkpoint(s) moved aside (%s), found in %.1f s",
                restored, latest, len(restore_report["corrupt"]), ", ".join(restore_report["corrupt"]),
                restore_report["seconds"],
            )  # fmt: skip
    elif config.init_from and task.trains_from_init:
        params, _, src_step = ckpt_lib.load_trained_params(config.init_from, "ema")
        params = task.adapt_init_params(params)  # e.g. txt2img weights for an inpainting model
        params = _match_init_params(params, abstract.params, config.init_from)
        params = transfer.to_mesh(params, state_shardings.params)
        # The state is built around the loaded weights: the model's random init, which they would replace, is never
        # compiled or run (SD-1.5's UNet and text encoder on a 2-core CPU: 27 s of compile, 5 s of run, 3.9 GB).
        state = jax.jit(init_state, out_shardings=state_shardings, donate_argnums=1)(init_rng, params)
        logging.info("initialised params from %s step %d", config.init_from, src_step)
    else:
        state = jax.jit(init_state, out_shardings=state_shardings)(init_rng)

    step = int(transfer.to_host(state.step))
    # The data position is the step: global batch s is the same on any number of processes (data/pipeline.py).
    data_iter = iter(task.train_loader(step))
    order_log = _DataOrderLog(workdir, train_cfg.record_data_order)
    bsharding = batch_sharding(mesh)
    bad_records = preprocess.BadRecordCount(config.data.source or config.data.name, config.data.max_bad_fraction)
    bad_records.restore(meta.get("bad_records"))  # a resumed run reports and limits the whole run's bad records

    def next_batch(at_step: int) -> dict:
        local = next(data_iter)
        order_log.record(at_step, local)
        bad_records.add(local["_bad"])
        return pipeline.to_global(local, bsharding)

    first_batch = next_batch(step) if step < train_cfg.num_steps else None
    if first_batch is not None:
        t0 = time.perf_counter()
        # Ahead-of-time compile: every step runs this one executable; a batch of another shape is an error.
        compiled = step_fn.lower(state, frozen, first_batch, train_rng).compile()
        _log_compiled(compiled, time.perf_counter() - t0)

    meta_out = {"task": config.task, **task_meta}
    if jax.process_index() == 0:
        resume_config.keep_previous(workdir, latest, changed)
        config_lib.save_config(config, storage.join(workdir, "config.json"))
    writer = MetricWriter(workdir)
    if restore_report and (restore_report["corrupt"] or restore_report["unused"]):
        # In the run's metrics too: a fallback a week into a run must not pass unnoticed.
        writer.scalars(
            step,
            {
                "checkpoint/fallback_from_step": float(latest),
                "checkpoint/corrupt_moved_aside": float(len(restore_report["corrupt"])),
                "checkpoint/unused_moved_aside": float(len(restore_report["unused"])),
                "checkpoint/restore_seconds": restore_report["seconds"],
            },
        )
    progress = Progress(step, train_cfg.num_steps)
    preemption = _PreemptionFlag()
    profiler = StepProfiler(workdir, step, train_cfg.profile_skip_steps, train_cfg.profile_steps)
    batch = first_batch
    try:
        while step < train_cfg.num_steps:
            if batch is None:
                batch = next_batch(step)
            profiler.before_step(step)
            with profiler.annotate(step):
                state, metrics = compiled(state, frozen, batch, train_rng)
            batch = None
            step += 1
            profiler.after_step(step, state)
            if step % train_cfg.log_every == 0 or step == train_cfg.num_steps:
                values = {k: float(v) for k, v in transfer.to_host(metrics).items()}
                values.update(bad_records.check())
                values["train/steps_per_sec"] = progress.report(step, values)
                writer.scalars(step, values)
                _check_nonfinite(state, train_cfg.max_nonfinite_streak, step)
            if train_cfg.preview_every and (step % train_cfg.preview_every == 0 or step == train_cfg.num_steps):
                images, eval_metrics = task.preview(state.ema_params, frozen, mesh)
                writer.scalars(step, eval_metrics)
                for name, img in images.items():
                    writer.image(step, f"preview/{name}", img)
                    if jax.process_index() == 0:
                        save_png(storage.join(workdir, "previews", f"{name}_{step:07d}.png"), img, upscale=2)
                if eval_metrics:
                    logging.info("step %d eval: %s", step, eval_metrics)
            if task.eval_every and (step % task.eval_every == 0 or step == train_cfg.num_steps):
                t_eval = time.perf_counter()
                eval_metrics = task.periodic_eval(state.ema_params, frozen, mesh)
                eval_metrics["eval/seconds"] = time.perf_counter() - t_eval
                writer.scalars(step, eval_metrics)
                logging.info("step %d evaluation: %s", step, eval_metrics)
            preempted = preemption.raised or ckpt.reached_preemption(step)
            if step % train_cfg.checkpoint_every == 0 or step == train_cfg.num_steps or preempted:
                if step % train_cfg.log_every and step != train_cfg.num_steps:
                    _check_nonfinite(state, train_cfg.max_nonfinite_streak, step)
                # Every batch fetched so far trained (the next is fetched at the next step): exact counts.
                saved_meta = {**meta_out, "bad_records": bad_records.totals().tolist()}
                ckpt.save(step, state, saved_meta, force=True, checksum=train_cfg.checkpoint_checksums)
            if preempted:
                logging.warning("preemption signal at step %d: checkpoint saved, stopping", step)
                break
    except BaseException:
        # The run is already failing: finish what can be finished without hiding its error behind a second one
        # (a save that failed fails its wait too).
        preemption.restore()
        for close in (lambda: profiler.finish(step), ckpt.wait, ckpt.close, writer.close, order_log.close):
            try:
                close()
            except Exception as e:
                logging.error("while stopping after an error: %s", e)
        raise
    preemption.restore()
    profiler.finish(step)  # a run that ended (or was preempted) before its last step to trace
    try:
        ckpt.wait()  # the last asynchronous save: a failure here names the folder (CheckpointSaveFailed)
    finally:
        ckpt.close()
        writer.close()
        order_log.close()
    return state
