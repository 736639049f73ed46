"""``train.profile_steps``: a ``jax.profiler`` trace of a few training steps of a run, written where TensorBoard's
profile plugin (xprof) looks for it.

Each process traces its own host and devices into a local temporary folder (the profiler names its files after the
host name, which the processes of one machine share, and writes only to local paths), then publishes the files as
``<workdir>/tensorboard/plugins/profile/steps_<first>-<last>/process_<i>.xplane.pb`` (for ``xprof
--logdir=<workdir>/tensorboard``) and ``process_<i>.trace.json.gz`` (the trace viewer's JSON: ui.perfetto.dev opens
it), on local disks and gs:// alike. Every traced step is marked with ``jax.profiler.StepTraceAnnotation``, so the
profile's step-time view splits the trace by training step.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import jax
from absl import logging

from ldm_jax import storage


class StepProfiler:
    """Traces the training steps ``first_step + skip + 1`` to ``first_step + skip + num`` of this run (steps as the
    loop counts them after a step), or none when ``num`` is 0. ``first_step`` is where this run started (a resumed
    run skips from its checkpoint's step), so warm-up steps after start-up stay out of the trace."""

    def __init__(self, workdir: str, first_step: int, skip: int, num: int):
        self.workdir = workdir
        self.start = first_step + skip  # the loop's counter before the first traced step
        self.stop = self.start + num
        self.enabled = num > 0
        self._tmp = None

    @property
    def active(self) -> bool:
        return self._tmp is not None

    def before_step(self, step: int) -> None:
        if self.enabled and step == self.start and not self.active:
            self._tmp = tempfile.mkdtemp(prefix="ldm_jax_profile_")
            jax.profiler.start_trace(self._tmp)
            logging.info("profiling steps %d-%d", self.start + 1, self.stop)

    def annotate(self, step: int):
        """A context for the step that runs from counter ``step``: marked in the trace while one is taken."""
        if not self.active:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step + 1)

    def after_step(self, step: int, state) -> None:
        if self.active and step == self.stop:
            jax.block_until_ready(state)  # the last traced step's device work inside the trace
            self.finish(step)

    def finish(self, last_step: int) -> None:
        """Stops a trace in progress (also a run that ends or fails before the last step to trace) and publishes
        what it holds; nothing if none is in progress. A trace that cannot be published is diagnostics, not the
        run: the error is logged and the trace kept in its local folder, and training goes on."""
        if not self.active:
            return
        tmp, self._tmp = self._tmp, None
        steps = f"{self.start + 1}-{last_step}"
        try:
            jax.profiler.stop_trace()
            written = self._publish(tmp, last_step)
        except Exception as e:
            logging.error("profile of steps %s not published (%s: %s); the trace is kept in %s", steps,
                          type(e).__name__, e, tmp)  # fmt: skip
            return
        shutil.rmtree(tmp, ignore_errors=True)
        logging.info(
            "profile of steps %s: %s (xprof --logdir=%s, or the .trace.json.gz in ui.perfetto.dev)",
            steps, ", ".join(written), storage.join(self.workdir, "tensorboard"),
        )  # fmt: skip

    def _publish(self, tmp: str, last_step: int) -> list[str]:
        # The profiler writes <tmp>/plugins/profile/<time>/<host>.xplane.pb and <host>.trace.json.gz.
        folder = os.path.join(tmp, "plugins", "profile")
        runs = os.listdir(folder) if os.path.isdir(folder) else []
        if len(runs) != 1 or not os.listdir(os.path.join(folder, runs[0])):
            raise RuntimeError(f"the profiler wrote {runs} into {folder}, not one folder of files")
        run = os.path.join(folder, runs[0])
        names = []
        for name in sorted(os.listdir(run)):  # named by process, since hosts can share a name
            names.append(f"process_{jax.process_index()}.{name.split('.', 1)[-1]}")
            os.rename(os.path.join(run, name), os.path.join(run, names[-1]))
        dest = storage.join(
            self.workdir, "tensorboard", "plugins", "profile", f"steps_{self.start + 1:07d}-{last_step:07d}"
        )
        storage.upload_tree(run, dest)
        return [storage.join(dest, name) for name in names]
