"""Run reporting: TensorBoard event files (tensorboardX, no TensorFlow needed), the same scalars as JSON lines in
``<workdir>/metrics.jsonl`` (for scripts and tests), and console progress with ETA.

Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Mapping

import jax
import numpy as np
from absl import logging

from ldm_jax import storage


class MetricWriter:
    def __init__(self, logdir: str):
        self._writer = None
        self._jsonl = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            # tensorboardX writes gs:// event files itself (google-cloud-storage, whole-file uploads on flush).
            self._writer = SummaryWriter(logdir=storage.join(logdir, "tensorboard"), flush_secs=30)
            self._jsonl = storage.AppendLog(storage.join(logdir, "metrics.jsonl"))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer is not None and values:
            for k, v in values.items():
                self._writer.add_scalar(k, float(v), step)
            # NaN / inf as strings: JSON has no literal for them, and a skipped step's loss may be one.
            row = {k: (float(v) if np.isfinite(v) else str(float(v))) for k, v in values.items()}
            self._jsonl.write(json.dumps({"step": step, **row}) + "\n")

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """``image``: uint8 [H, W, 3]."""
        if self._writer is not None:
            self._writer.add_image(name, image, step, dataformats="HWC")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._jsonl.close()


class Progress:
    """Steps/s over the last reporting window and an ETA for the remaining steps."""

    def __init__(self, first_step: int, total_steps: int):
        self.total = total_steps
        self._last_step = first_step
        self._last_time = time.perf_counter()

    def report(self, step: int, metrics: Mapping[str, float]) -> float:
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items())
        logging.info("step %d/%d  %.2f steps/s  ETA %s  %s", step, self.total, rate, _fmt(eta), shown)
        return rate


def _fmt(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


class _LibraryInfoFilter:
    """Drops INFO records from checkpointing/data libraries, which log several lines per array on every save."""

    _NOISY = (os.sep + "orbax" + os.sep, os.sep + "grain" + os.sep, os.sep + "tensorflow_datasets" + os.sep)

    def filter(self, record) -> bool:
        return record.levelno > 20 or not any(part in record.pathname for part in self._NOISY)


def quiet_library_logs() -> None:
    import logging as py_logging

    handler = logging.get_absl_handler()
    handler.addFilter(_LibraryInfoFilter())
    py_logging.getLogger("absl").addFilter(_LibraryInfoFilter())
