"""Multi-process (multi-host) start-up: one ``jax.distributed.initialize`` per process, before any JAX computation.

Every entry point calls ``initialize(...)`` with its ``--coordinator_address``, ``--num_processes``,
``--process_id`` and ``--local_device_ids`` flags. Where the settings come from, first match wins:

1. the flags; any of the three left unset is read from its environment variable (``LDM_JAX_COORDINATOR_ADDRESS``,
   ``LDM_JAX_NUM_PROCESSES``, ``LDM_JAX_PROCESS_ID``), and if any is given all three must be;
2. ``LDM_JAX_DISTRIBUTED=auto`` (let JAX detect the cluster: a Cloud TPU VM pod slice, whose worker list is only in
   the GCE metadata server, is detected this way; ``launch/tpu_pod.sh`` sets it) or ``=off`` (one process, whatever
   the environment says: e.g. a single ``python`` inside a multi-task ``salloc``);
3. a multi-process cluster read from the environment, without network calls: SLURM (``SLURM_JOB_ID`` and
   ``SLURM_NTASKS`` > 1, i.e. inside ``srun``), a TPU slice whose worker list is in the environment
   (``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` with several hosts, GKE) or several slices
   (``MEGASCALE_NUM_SLICES`` > 1), Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1). JAX's own cluster detection
   (``jax._src.clusters``) then finds the coordinator, the process count and this process's id;
4. otherwise one process, and ``jax.distributed`` is not started.

``--local_device_ids`` (``LDM_JAX_LOCAL_DEVICE_IDS``, comma-separated) restricts a GPU process to those devices.
Under SLURM, JAX otherwise gives each process only the GPU numbered ``SLURM_LOCALID``: right for one process per GPU,
wrong for one process per node, which must list every local GPU (``launch/gpu_slurm.sh`` does).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence

from absl import logging

ENV_ADDRESS = "LDM_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "LDM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LDM_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "LDM_JAX_LOCAL_DEVICE_IDS"
ENV_MODE = "LDM_JAX_DISTRIBUTED"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process starts. ``mode``: ``single`` (no ``jax.distributed``), ``explicit`` (address, count and id
    given) or ``auto`` (``jax.distributed.initialize()`` detects the cluster). ``reason`` says why, for the log."""

    mode: str
    reason: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}={value!r}: must be an integer") from e


def _device_ids(value, name: str) -> tuple[int, ...] | None:
    if value is None or len(value) == 0:
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        ids = tuple(int(x) for x in items)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}={value!r}: must be comma-separated device ids, e.g. 0,1,2,3") from e
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"{name}={value!r}: device ids must be distinct and >= 0")
    return ids


def _env_count(env: Mapping[str, str], name: str) -> int:
    """An integer count from the environment; 0 when unset, empty or not a number (not ours to validate)."""
    try:
        return int(env.get(name, "") or 0)
    except ValueError:
        return 0


def _cluster(env: Mapping[str, str]) -> str | None:
    """A multi-process cluster JAX can detect on its own, from environment variables only; None if none."""
    if env.get("SLURM_JOB_ID") and _env_count(env, "SLURM_NTASKS") > 1:
        return f"SLURM job {env['SLURM_JOB_ID']} with SLURM_NTASKS={env['SLURM_NTASKS']}"
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = [h for h in env.get(name, "").split(",") if h.strip()]
        if len(hosts) > 1:
            return f"TPU slice with {len(hosts)} workers ({name})"
    if _env_count(env, "MEGASCALE_NUM_SLICES") > 1:
        return f"multislice TPU, MEGASCALE_NUM_SLICES={env['MEGASCALE_NUM_SLICES']}"
    if _env_count(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return f"Open MPI job with OMPI_COMM_WORLD_SIZE={env['OMPI_COMM_WORLD_SIZE']}"
    return None


def resolve(
    coordinator_address: str = "",
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | str | None = None,
    env: Mapping[str, str] | None = None,
) -> Plan:
    """The start-up plan for these flag values and environment (``os.environ`` by default); pure, starts nothing.

    Raises ValueError naming the flag and environment variable of a missing or invalid setting.
    """
    env = os.environ if env is None else env
    if local_device_ids is None or len(local_device_ids) == 0:
        ids = _device_ids(env.get(ENV_LOCAL_DEVICE_IDS), ENV_LOCAL_DEVICE_IDS)
    else:
        ids = _device_ids(local_device_ids, "--local_device_ids")

    # (flag, env var, value from the flag or else the environment, where it came from)
    fields = []
    for flag, var, value in (
        ("--coordinator_address", ENV_ADDRESS, coordinator_address or None),
        ("--num_processes", ENV_NUM_PROCESSES, num_processes),
        ("--process_id", ENV_PROCESS_ID, process_id),
    ):
        if value is not None:
            fields.append((flag, var, value, flag))
        elif env.get(var, ""):
            fields.append((flag, var, env[var], var))
        else:
            fields.append((flag, var, None, None))
    if any(value is not None for _, _, value, _ in fields):
        missing = [f"{flag} (or {var})" for flag, var, value, _ in fields if value is None]
        given = ", ".join(f"{source}={value}" for _, _, value, source in fields if value is not None)
        if missing:
            raise ValueError(
                f"multi-process settings are incomplete: {given} given, {' and '.join(missing)} missing; give all "
                "three, or none to detect the cluster"
            )
        (_, _, address, address_src), (_, _, count, count_src), (_, _, pid, pid_src) = fields
        address = str(address)
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{address_src}={address!r}: must be host:port, e.g. 10.0.0.1:1234")
        count = _int(count, count_src)
        pid = _int(pid, pid_src)
        if count < 1:
            raise ValueError(f"{count_src}={count}: must be >= 1")
        if not 0 <= pid < count:
            raise ValueError(f"{pid_src}={pid}: must be >= 0 and < {count_src}={count}")
        return Plan("explicit", f"coordinator {address}", address, count, pid, ids)

    mode = env.get(ENV_MODE, "")
    if mode == "off":
        return Plan("single", f"{ENV_MODE}=off")
    if mode == "auto":
        return Plan("auto", f"{ENV_MODE}=auto", local_device_ids=ids)
    if mode:
        raise ValueError(f"{ENV_MODE}={mode!r}: must be 'auto', 'off' or unset")
    cluster = _cluster(env)
    if cluster:
        return Plan("auto", cluster, local_device_ids=ids)
    return Plan("single", "no multi-process settings or cluster found", local_device_ids=ids)


_initialized = False


def initialize(
    coordinator_address: str = "",
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | str | None = None,
) -> None:
    """Starts ``jax.distributed`` as ``resolve`` decides (see the module docstring) and logs the process and device
    counts. Call once per process before any JAX computation; later calls do nothing."""
    global _initialized
    if _initialized:
        return
    import jax

    plan = resolve(coordinator_address, num_processes, process_id, local_device_ids)
    ids = list(plan.local_device_ids) if plan.local_device_ids is not None else None
    if jax.distributed.is_initialized():
        logging.info("jax.distributed was already initialised; not starting it again (%s)", plan.reason)
    elif plan.mode == "explicit":
        logging.info("starting jax.distributed: process %d of %d, %s", plan.process_id, plan.num_processes, plan.reason)
        jax.distributed.initialize(
            coordinator_address=plan.coordinator_address,
            num_processes=plan.num_processes,
            process_id=plan.process_id,
            local_device_ids=ids,
        )
    elif plan.mode == "auto":
        logging.info("starting jax.distributed with cluster auto-detection: %s", plan.reason)
        jax.distributed.initialize(local_device_ids=ids)
    elif ids is not None:
        logging.warning("--local_device_ids=%s ignored: a single-process run uses every local device", ids)
    _initialized = True
    local, devices = jax.local_devices(), jax.devices()
    logging.info(
        "process %d of %d (%s): %d local devices (%s), %d global devices",
        jax.process_index(),
        jax.process_count(),
        plan.reason,
        len(local),
        local[0].platform if local else "none",
        len(devices),
    )


def define_flags() -> Callable[[], None]:
    """Defines ``--coordinator_address``, ``--num_processes``, ``--process_id`` and ``--local_device_ids`` for an
    entry point (call at its module level, once); returns the function its ``main`` calls, before any JAX
    computation, to ``initialize`` from them (a missing or invalid setting becomes a usage error naming it)."""
    from absl import app, flags

    coordinator = flags.DEFINE_string(
        "coordinator_address", "", "Multi-process: process 0's host:port (default: $LDM_JAX_COORDINATOR_ADDRESS)."
    )
    num_processes = flags.DEFINE_integer(
        "num_processes", None, "Multi-process: number of processes (default: $LDM_JAX_NUM_PROCESSES)."
    )
    process_id = flags.DEFINE_integer(
        "process_id", None, "Multi-process: this process's id in [0, num_processes) (default: $LDM_JAX_PROCESS_ID)."
    )
    local_device_ids = flags.DEFINE_list(
        "local_device_ids",
        None,
        "GPU ids this process uses, comma-separated (default: $LDM_JAX_LOCAL_DEVICE_IDS; under SLURM, JAX's default "
        "is the one GPU numbered SLURM_LOCALID).",
    )

    def initialize_from_flags() -> None:
        try:
            initialize(coordinator.value, num_processes.value, process_id.value, local_device_ids.value)
        except ValueError as e:  # names the missing or invalid flag / environment variable
            raise app.UsageError(str(e)) from e

    return initialize_from_flags


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (nothing to wait for in a single-process run)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def process_0_says(value: bool) -> bool:
    """Process 0's ``value`` in every process: for a decision that rests on what process 0 sees (a file on its
    disk), which every process must then follow alike or leave its peers' collectives unmatched."""
    import jax

    if jax.process_count() == 1:
        return bool(value)
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(value))))


def processes_where(flag: bool) -> list[int]:
    """The indices of the processes whose ``flag`` is true, in every process (every process must call it): e.g.
    which ones refused a folder as they see it, so that all stop alike."""
    import jax

    if jax.process_count() == 1:
        return [0] if flag else []
    import numpy as np
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.int32(flag))).reshape(-1)
    return [int(i) for i in np.flatnonzero(flags)]


def process_0_ints(values: Sequence[int]) -> list[int]:
    """Process 0's list of integers in every process (the lists may differ in length): e.g. which files to make,
    decided on what process 0's disk holds, when every process must then take part in making each."""
    import jax

    if jax.process_count() == 1:
        return [int(v) for v in values]
    import numpy as np
    from jax.experimental import multihost_utils

    count = int(multihost_utils.broadcast_one_to_all(np.int32(len(values))))
    mine = np.zeros(count, np.int64)
    mine[: min(count, len(values))] = list(values)[:count]
    return [int(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(mine))]
