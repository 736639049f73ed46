"""Real process deaths: SIGTERM saves and exits cleanly; kill -9 during and between asynchronous checkpoint saves,
then restart, ends bit for bit where an uninterrupted run ends, having seen the same batches at every step."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from cli import ROOT, xla_flags

from ldm_jax.training import checkpoint as ckpt_lib


def _train(workdir, data_dir, *extra, kill_at="", devices=8):
    """Starts ``ldm_jax.train`` on the tiny first stage (no discriminator) as a user would, in its own process."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices))
    env.pop("LDM_JAX_KILL_AT", None)
    if kill_at:
        env["LDM_JAX_KILL_AT"] = kill_at
    cmd = [
        sys.executable,
        "-m",
        "ldm_jax.train",
        "--config=configs/autoencoder_kl.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.disc.enabled=False",
        "--config.train.record_data_order=True",
        "--config.train.log_every=1",
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _order(workdir):
    path = os.path.join(workdir, "data_order", "process_0.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _wait_for_steps(proc, workdir, count, timeout=300):
    """Waits until ``count`` batches have been recorded in ``workdir`` (the process fetched them)."""
    deadline = time.time() + timeout
    while len(_order(workdir)) < count:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no batch {count} within {timeout} s")
        time.sleep(0.2)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    proc = _train(workdir, data_dir, "--config.train.num_steps=100000", "--config.train.checkpoint_every=100000")
    _wait_for_steps(proc, workdir, 4)
    proc.send_signal(signal.SIGTERM)
    rc, err = _finish(proc)
    assert rc == 0, err[-3000:]
    assert "preemption signal at step" in err
    ckpt = ckpt_lib.Checkpointer(workdir, 3)
    saved = ckpt.latest_step()
    ckpt.close()
    assert saved is not None and 3 <= saved < 100000, saved


def _leaves(workdir, which):
    params, _, step = ckpt_lib.load_trained_params(workdir, which)
    return step, [np.asarray(x) for x in jax.tree.leaves(params)]


def test_kill_9_during_and_between_async_saves_then_resume_is_bit_exact(data_dir, tmp_path):
    steps = ["--config.train.num_steps=10", "--config.train.checkpoint_every=2"]
    full = str(tmp_path / "full")
    rc, err = _finish(_train(full, data_dir, *steps))
    assert rc == 0, err[-3000:]

    crashed = str(tmp_path / "crashed")
    # 1. SIGKILL right after the asynchronous save of step 4 has started: its files are half-written.
    rc, err = _finish(_train(crashed, data_dir, *steps, kill_at="during_save:4"))
    assert rc == -signal.SIGKILL, (rc, err[-3000:])
    # 2. Restart, and SIGKILL again from outside once it has fetched two batches past its checkpoint.
    before = len(_order(crashed))
    proc = _train(crashed, data_dir, *steps)
    _wait_for_steps(proc, crashed, before + 3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    # 3. Restart and finish.
    rc, err = _finish(_train(crashed, data_dir, *steps))
    assert rc == 0, err[-3000:]
    assert "resuming from" in err

    for which in ("params", "ema"):
        step_a, a = _leaves(full, which)
        step_b, b = _leaves(crashed, which)
        assert step_a == step_b == 10
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    # Data order: every step's batch, including the steps run twice across the kills, is the uninterrupted run's.
    reference = {r["step"]: r["sha1"] for r in _order(full)}
    assert sorted(reference) == list(range(10))
    seen = _order(crashed)
    assert {r["step"] for r in seen} == set(range(10)) and len(seen) > 10  # some steps ran again after a kill
    for r in seen:
        assert r["sha1"] == reference[r["step"]], r
