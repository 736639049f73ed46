"""Multi-process start-up: where the settings come from (pure ``resolve``), and two real processes joining one JAX
distributed system on 4 fake CPU devices each."""

import json
import sys
import time

import pytest

from cli import free_port, start, wait_all

from ldm_jax.training import distributed
from ldm_jax.training.distributed import resolve

ENV = {
    "LDM_JAX_COORDINATOR_ADDRESS": "10.0.0.2:5678",
    "LDM_JAX_NUM_PROCESSES": "4",
    "LDM_JAX_PROCESS_ID": "3",
}
ENV_VALUES = ("10.0.0.2:5678", 4, 3)
# Inside `srun --ntasks=8` (the variables JAX's SlurmCluster reads).
SLURM = {
    "SLURM_JOB_ID": "1234",
    "SLURM_NTASKS": "8",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_NODELIST": "node[001-002]",
}


def test_nothing_is_one_process():
    plan = resolve(env={})
    assert plan.mode == "single" and plan.num_processes is None


def test_flags_alone():
    plan = resolve("10.0.0.1:1234", 2, 1, env={})
    assert (plan.mode, plan.coordinator_address, plan.num_processes, plan.process_id) == (
        "explicit",
        "10.0.0.1:1234",
        2,
        1,
    )


def test_env_alone():
    plan = resolve(env=ENV)
    assert (plan.mode, plan.coordinator_address, plan.num_processes, plan.process_id) == ("explicit", *ENV_VALUES)


def test_flags_win_over_env_and_over_a_cluster():
    plan = resolve("10.0.0.1:1234", 2, 0, "0,1", env={**ENV, **SLURM, "LDM_JAX_LOCAL_DEVICE_IDS": "5"})
    assert (plan.mode, plan.coordinator_address, plan.num_processes, plan.process_id) == (
        "explicit",
        "10.0.0.1:1234",
        2,
        0,
    )
    assert plan.local_device_ids == (0, 1)
    # A flag left unset is taken from its environment variable.
    plan = resolve(process_id=1, env=ENV)
    assert (plan.coordinator_address, plan.num_processes, plan.process_id) == ("10.0.0.2:5678", 4, 1)


def test_slurm_with_several_tasks_is_auto_detected():
    plan = resolve(env=SLURM)
    assert plan.mode == "auto" and "SLURM" in plan.reason
    assert plan.num_processes is None  # left to jax.distributed.initialize()
    assert resolve(local_device_ids=["0", "1", "2", "3"], env=SLURM).local_device_ids == (0, 1, 2, 3)
    assert resolve(env={**SLURM, "LDM_JAX_LOCAL_DEVICE_IDS": "2"}).local_device_ids == (2,)


def test_single_task_slurm_is_one_process():
    assert resolve(env={**SLURM, "SLURM_NTASKS": "1"}).mode == "single"
    assert resolve(env={"SLURM_NTASKS": "8"}).mode == "single"  # no job id: not inside SLURM


def test_tpu_and_mpi_clusters_from_the_environment():
    assert resolve(env={"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}).mode == "auto"
    assert resolve(env={"TPU_WORKER_HOSTNAMES": "w-0"}).mode == "single"
    assert resolve(env={"MEGASCALE_NUM_SLICES": "2"}).mode == "auto"
    assert resolve(env={"OMPI_COMM_WORLD_SIZE": "2"}).mode == "auto"


def test_mode_override():
    assert resolve(env={"LDM_JAX_DISTRIBUTED": "auto"}).mode == "auto"  # e.g. a GCE TPU VM pod slice
    assert resolve(env={**SLURM, "LDM_JAX_DISTRIBUTED": "off"}).mode == "single"
    assert resolve(env={**ENV, "LDM_JAX_DISTRIBUTED": "off"}).mode == "explicit"  # explicit settings still win
    with pytest.raises(ValueError, match="LDM_JAX_DISTRIBUTED='yes'"):
        resolve(env={"LDM_JAX_DISTRIBUTED": "yes"})


@pytest.mark.parametrize(
    "kwargs, env, missing",
    [
        (dict(coordinator_address="10.0.0.1:1234"), {}, ["--num_processes (or LDM_JAX_NUM_PROCESSES)", "--process_id"]),
        (dict(coordinator_address="10.0.0.1:1234", num_processes=2), {}, ["--process_id (or LDM_JAX_PROCESS_ID)"]),
        (dict(process_id=0), {}, ["--coordinator_address (or LDM_JAX_COORDINATOR_ADDRESS)"]),
        ({}, {"LDM_JAX_NUM_PROCESSES": "2", "LDM_JAX_PROCESS_ID": "0"}, ["--coordinator_address"]),
    ],
)
def test_partial_settings_name_the_missing_piece(kwargs, env, missing):
    with pytest.raises(ValueError, match="incomplete") as e:
        resolve(**kwargs, env=env)
    for piece in missing:
        assert piece in str(e.value)


@pytest.mark.parametrize(
    "kwargs, env, message",
    [
        (dict(coordinator_address="10.0.0.1", num_processes=2, process_id=0), {}, "--coordinator_address='10.0.0.1'"),
        (
            dict(coordinator_address="h:1", num_processes=2, process_id=2),
            {},
            "--process_id=2: must be >= 0 and < --num_processes=2",
        ),
        (dict(coordinator_address="h:1", num_processes=0, process_id=0), {}, "--num_processes=0"),
        ({}, {**ENV, "LDM_JAX_NUM_PROCESSES": "two"}, "LDM_JAX_NUM_PROCESSES='two'"),
        (dict(local_device_ids="0,x"), {}, "--local_device_ids='0,x'"),
    ],
)
def test_invalid_settings_name_the_flag(kwargs, env, message):
    with pytest.raises(ValueError, match=message):
        resolve(**kwargs, env=env)


def test_initialize_single_process_is_idempotent(monkeypatch):
    for var in (*ENV, *SLURM, "LDM_JAX_DISTRIBUTED", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    distributed.initialize()
    distributed.initialize("10.0.0.1:1", 2, 0)  # already initialised: not started again
    import jax

    assert jax.process_count() == 1 and not jax.distributed.is_initialized()


# One process of a two-process run: initialise (twice: the second call is a no-op), then gather every process's index
# across the two processes. The result goes to its own file: stdout and stderr share the log, and a runtime's stderr
# line (Gloo's) can land mid-line in it.
WORKER = """
import json, sys
import jax, jax.numpy as jnp
from jax.experimental import multihost_utils
from ldm_jax.training import distributed
args = json.loads(sys.argv[1])
distributed.initialize(*args)
distributed.initialize(*args)
gathered = multihost_utils.process_allgather(jnp.array([jax.process_index()]))
result = dict(
    process_count=jax.process_count(), process_index=jax.process_index(), device_count=jax.device_count(),
    local_device_count=jax.local_device_count(), gathered=[int(x) for x in gathered.reshape(-1)])
with open(sys.argv[2], "w") as f:
    json.dump(result, f)
"""


def _run_two(tmp_path, args_of, env_of, timeout=120):
    """Starts processes 0 and 1 together; returns their result dicts. Fails, never hangs, when one dies (the other is
    killed at once rather than left waiting for its peer) or when they are not done within ``timeout`` seconds."""
    cluster = ("LDM_JAX_", "SLURM_", "OMPI_", "TPU_")  # this machine's own settings must not leak in
    procs = [
        start(
            [sys.executable, "-c", WORKER, json.dumps(args_of(i)), str(tmp_path / f"result{i}.json")],
            str(tmp_path / f"out{i}.txt"),
            4,
            {"JAX_PLATFORMS": "cpu", **env_of(i)},
            drop=cluster,
        )
        for i in range(2)
    ]
    wait_all(procs, timeout)
    return [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(2)]


def _check(results):
    for i, r in enumerate(results):
        assert r == dict(process_count=2, process_index=i, device_count=8, local_device_count=4, gathered=[0, 1])


def test_two_processes_from_flags(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    _check(_run_two(tmp_path, lambda i: [address, 2, i], lambda i: {}))


def test_a_dead_process_fails_the_run_without_hanging(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"process 1 exited with 1[\s\S]*--process_id=2"):
        _run_two(tmp_path, lambda i: [address, 2, 2 * i], lambda i: {})  # process 1's id is out of range
    assert time.monotonic() - t0 < 60  # process 0 was killed, not left waiting for its peer


def test_two_processes_from_env(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    env = {"LDM_JAX_COORDINATOR_ADDRESS": address, "LDM_JAX_NUM_PROCESSES": "2"}
    _check(_run_two(tmp_path, lambda i: [], lambda i: {**env, "LDM_JAX_PROCESS_ID": str(i)}))
