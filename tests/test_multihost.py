"""Two processes with 4 CPU devices each (jax.distributed over 127.0.0.1) train like one process with 8 devices,
and their checkpoint resumes in a single process."""

import copy
import json
import os
import re
import sys

import jax
import numpy as np
from cli import two_process_job, wait_all

from configs import autoencoder_kl
from ldm_jax.training import checkpoint as ckpt_lib
from ldm_jax.training import loop


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["train/loss"] for line in f]


def test_two_processes_match_one_process_and_their_checkpoint_resumes_in_one(data_dir, tmp_path):
    config = autoencoder_kl.get_config("tiny")
    config.data.data_dir = data_dir
    config.disc.enabled = False
    config.train.update(num_steps=4, log_every=1, checkpoint_every=4)

    two = str(tmp_path / "two")
    procs = two_process_job(
        [
            sys.executable,
            "-m",
            "ldm_jax.train",
            "--config=configs/autoencoder_kl.py:tiny",
            f"--workdir={two}",
            f"--config.data.data_dir={data_dir}",
            "--config.disc.enabled=False",
            "--config.train.num_steps=4",
            "--config.train.log_every=1",
            "--config.train.checkpoint_every=4",
            # Each process traces step 2 (train.profile_steps; checked below).
            "--config.train.profile_steps=1",
            "--config.train.profile_skip_steps=1",
        ],
        str(tmp_path / "train"),
        devices=4,
    )
    outputs = wait_all(procs, timeout=420)
    assert "(2 processes)" in outputs[0]
    _check_profile(two, "steps_0000002-0000002", processes=2, steps=[2])
    # Process 1 compiled nothing that spans both processes: it loaded process 0's executables (cli.two_process_job).
    assert re.search(r"compile_sharing: [1-9]\d* programs from process 0", outputs[1]), outputs[1][-2000:]
    # Only process 0 writes logs.
    assert os.path.exists(os.path.join(two, "metrics.jsonl")) and os.path.exists(os.path.join(two, "config.json"))

    one = str(tmp_path / "one")
    single = loop.train_and_evaluate(copy.deepcopy(config), one)
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
    params, _, step = ckpt_lib.load_trained_params(two, "params")
    assert step == 4
    compared = 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(single.params), strict=True):
        name = jax.tree_util.keystr(path)
        if "to_k" in name and "bias" in name:
            # Softmax ignores a constant added to every key, so this gradient is zero in exact arithmetic: what is
            # left is rounding noise, which Adam scales to full-size steps whose sign depends on the reduction
            # order (it differs between any two device layouts).
            continue
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=name)
        compared += 1
    assert compared > 100

    # The two-process checkpoint (state written by both) resumes here, in one process, and goes on.
    # A profile counts its steps from where this run started (step 4), and a run that ends before the last step to
    # trace (6 < 4 + 5) publishes what it traced.
    resumed = copy.deepcopy(config)
    resumed.train.update(num_steps=6, profile_steps=5, profile_skip_steps=0)
    state = loop.train_and_evaluate(resumed, two)
    assert int(state.step) == 6
    assert len(_losses(two)) == 6
    _check_profile(two, "steps_0000005-0000006", processes=1, steps=[5, 6])


def _check_profile(workdir: str, name: str, processes: int, steps: list[int]) -> None:
    """Each process's trace in the layout xprof reads, holding the training steps it names and their XLA work."""
    folder = os.path.join(workdir, "tensorboard", "plugins", "profile", name)
    assert sorted(os.listdir(folder)) == sorted(
        f"process_{i}.{kind}" for i in range(processes) for kind in ("trace.json.gz", "xplane.pb")
    )
    for i in range(processes):
        data = jax.profiler.ProfileData.from_file(os.path.join(folder, f"process_{i}.xplane.pb"))
        events = [(line.name, event) for plane in data.planes for line in plane.lines for event in line.events]
        traced = sorted(int(dict(e.stats)["step_num"]) for _, e in events if e.name == "train")
        assert traced == steps, traced
        assert any(line.startswith("tf_XLA") for line, _ in events)  # the executable's own operations


def _probe_job(tmp_path, job: str, share_compiles: bool) -> list[str]:
    """``tests/sharing_probe.py`` as a two-process job on the persistent cache ``tmp_path/cache`` (every program
    cached); checks that both processes computed what one process does and returns their logs."""
    from sharing_probe import program, rows

    env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    argv = [sys.executable, "-m", "tests.sharing_probe", f"--out={tmp_path / job}"]
    job_procs = two_process_job(argv, str(tmp_path / job), env=env, share_compiles=share_compiles)
    outputs = wait_all(job_procs, timeout=300)
    expected = np.asarray(program(np.concatenate([rows(0), rows(1)])))
    for process in (0, 1):
        np.testing.assert_allclose(np.load(tmp_path / f"{job}.{process}.npy"), expected, rtol=1e-6)
    return outputs


def test_a_program_process_0_loads_from_the_cache_reaches_process_1(tmp_path):
    """``compile_sharing.py`` in both of its paths: the first job's process 0 compiles the program and hands it
    over; the second job's process 0 loads it from the persistent cache and hands over the entry (an executable
    re-serialised after loading lacks its XLA:CPU kernels, and process 1 failed with "Function ... not found").
    Both processes of both jobs compute what one process does."""
    for job in ("compiled", "from_cache"):
        outputs = _probe_job(tmp_path, job, share_compiles=True)
        assert "compile_sharing: 1 programs from process 0" in outputs[1], outputs[1][-2000:]
    assert os.listdir(tmp_path / "cache")  # the second job had an entry to load


def test_a_multi_process_cpu_job_keeps_the_persistent_cache_off(tmp_path):
    """Without the tests' executable sharing, a multi-process CPU job's processes would mix programs: on CPU each
    keys its programs by its own host and only process 0 writes the cache, so a restarted job's process 0 loads
    what the others compile, and since jaxlib 0.12.1 such a pair waits forever in its first all-reduce (a resumed
    two-process ``ldm_jax.train`` with ``--compilation_cache_dir`` did). ``jax_setup`` turns the cache off there
    and says so; both jobs finish, compute what one process does and write nothing to the cache."""
    for job in ("first", "restarted"):
        outputs = _probe_job(tmp_path, job, share_compiles=False)
        for process in (0, 1):
            assert "the persistent compilation cache is off in a multi-process CPU job" in outputs[process]
    cache = tmp_path / "cache"
    assert not cache.exists() or not os.listdir(cache)
