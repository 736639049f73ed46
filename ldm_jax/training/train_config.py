"""``config.train``: the training loop's section (how long, how often to log, preview and checkpoint, and the
step's options)."""

from __future__ import annotations

import dataclasses

from ldm_jax import config_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(config_lib.Section):
    """``config.train``: how long, how often to log, preview and checkpoint, and the step's options."""

    num_steps: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int = 3
    # Also keep every checkpoint whose step is a multiple of this (0: none): a long run's history.
    keep_every: int = 0
    # Resume from this step instead of the newest (-1); newer checkpoints are moved aside, not deleted.
    restore_step: int = -1
    # A newest checkpoint that does not restore: "fallback" moves it aside (<step>.corrupt-<time>) and resumes from
    # the newest one that does, "fail" stops.
    on_corrupt_checkpoint: str = "fallback"
    async_checkpointing: bool = True
    # Per-leaf checksums of the state saved with each checkpoint and checked on resume (training/checksums.py):
    # bytes flipped inside an array's data otherwise restore silently. Costs a host pass over the state per save
    # (0.14 s for the demo's 66 MiB on CPU).
    checkpoint_checksums: bool = True
    preview_every: int  # 0 disables preview grids during training
    # Gradient accumulation: the global batch is split into this many micro-batches inside the step.
    grad_accum_steps: int = 1
    # Steps in a row with a non-finite loss or gradient (each skipped, params unchanged) that stop the run.
    max_nonfinite_streak: int = 5
    compilation_cache_dir: str = ""  # persistent XLA compilation cache shared by runs ("" = off)
    # Log a digest of every local batch to <workdir>/data_order/process_<i>.jsonl (audits resume / data).
    record_data_order: bool = False
    # A jax.profiler trace of this many steps by every process (0: off), after profile_skip_steps steps of this run
    # (past start-up and warm-up): <workdir>/tensorboard/plugins/profile/steps_<a>-<b>/process_<i>.xplane.pb for
    # `xprof --logdir=<workdir>/tensorboard`, and .trace.json.gz beside it (training/profiling.py).
    profile_steps: int = 0
    profile_skip_steps: int = 3

    def validate(self, prefix: str) -> None:
        self.check(self.num_steps >= 1, prefix, "num_steps", "must be >= 1")
        for name in ("log_every", "checkpoint_every", "keep_checkpoints", "grad_accum_steps", "max_nonfinite_streak"):
            self.check(getattr(self, name) >= 1, prefix, name, "must be >= 1")
        self.check(self.preview_every >= 0, prefix, "preview_every", "must be >= 0")
        self.check(self.profile_steps >= 0, prefix, "profile_steps", "must be >= 0 (0 = no profile)")
        self.check(self.profile_skip_steps >= 0, prefix, "profile_skip_steps", "must be >= 0")
        self.check(self.keep_every >= 0, prefix, "keep_every", "must be >= 0 (0 = keep only the last keep_checkpoints)")
        self.check(
            self.keep_every % self.checkpoint_every == 0,
            prefix,
            "keep_every",
            f"must be a multiple of {prefix}checkpoint_every={self.checkpoint_every}: only saved steps can be kept "
            f"(else one in lcm steps is)",
        )
        self.check(self.restore_step >= -1, prefix, "restore_step", "must be >= 0, or -1 for the newest checkpoint")
        self.check(self.on_corrupt_checkpoint in ("fallback", "fail"), prefix, "on_corrupt_checkpoint",
                   "must be 'fallback' or 'fail'")  # fmt: skip


def train_section(num_steps: int, log_every: int, checkpoint_every: int, preview_every: int):
    return TrainConfig.defaults(
        num_steps=num_steps, log_every=log_every, checkpoint_every=checkpoint_every, preview_every=preview_every
    )
