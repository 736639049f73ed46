"""Running the package's command-line entry points as a user would: a fresh process from the repository root."""

import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LLVM optimisation level 0 for XLA:CPU code generation: the suite's tiny programs compile 2-4x faster (a tiny
# txt2img train step: 44 s -> 25 s, its sharded init 58 s -> 13 s on a 2-core CI machine) and run a little slower,
# with the same results (the same loss digits in that probe). Every test process, pytest's own and the CLI
# subprocesses it starts, uses the same flags, so results compared across processes come from the same code.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with ``devices`` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"


def run_module(module: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` on the tests' 8 fake CPU devices; stdout and stderr captured as text."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(8))
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    argv: list[str],
    log: str,
    devices: int = 8,
    env: dict | None = None,
    drop: tuple[str, ...] = (),
    cwd: str = ROOT,
) -> subprocess.Popen:
    """``argv`` from the repository root on ``devices`` fake CPU devices, stdout and stderr into the file ``log``
    (a file, not a pipe: a chatty process never blocks on a full pipe while its peers wait for it). The environment
    is this one without the variables whose names start with one of ``drop``, plus ``env``."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(drop)} if drop else dict(os.environ)
    env = {**inherited, "XLA_FLAGS": xla_flags(devices), **(env or {})}
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def wait_for(procs: list[subprocess.Popen], timeout: float, stop_on_failure: bool = True) -> list[str]:
    """Waits for processes started together and returns their outputs; never hangs: all still running at the
    timeout are killed, and with ``stop_on_failure`` the others too as soon as one exits non-zero (a process whose
    peer died waits in its next collective forever, spinning a core). A killed process's code is negative."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = stop_on_failure and any(p.poll() not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for p in procs:
        with open(p.log) as f:
            outputs.append(f.read())
    return outputs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """``wait_for``, failing unless every process exited 0."""
    outputs = wait_for(procs, timeout)
    bad = [
        f"process {i} exited with {p.returncode}:\n{out[-4000:]}"
        for i, (p, out) in enumerate(zip(procs, outputs, strict=True))
    ]
    bad = [b for b, p in zip(bad, procs, strict=True) if p.returncode]
    assert not bad, "\n".join(bad)
    return outputs


def two_process_job(
    argv: list[str],
    log: str,
    devices: int = 2,
    env: dict | None = None,
    share_compiles: bool = True,
    process_env: tuple[dict, dict] = ({}, {}),
    process_cwd: tuple[str, str] = (ROOT, ROOT),
) -> list[subprocess.Popen]:
    """``argv`` as 2 processes of ``devices`` fake CPU devices each, joined over 127.0.0.1 (each gets the flags
    ``--coordinator_address``, ``--num_processes=2``, ``--process_id``); outputs in ``<log>_<i>.log``. A
    ``python -m MODULE`` job runs through ``compile_sharing.py`` unless ``share_compiles`` is False: process 0
    compiles each program that spans both processes, process 1 loads its executable. ``process_env[i]``: variables
    of process i alone (what differs between hosts, e.g. a home folder); ``process_cwd[i]``: its working folder (two
    hosts that share no filesystem: the same relative path names a folder of each)."""
    if argv[1:2] == ["-m"] and share_compiles:
        argv = [argv[0], os.path.join(ROOT, "tests", "compile_sharing.py"), *argv[2:]]
    port = free_port()
    flags = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    return [
        start(
            [*argv, *flags, f"--process_id={i}"],
            f"{log}_{i}.log",
            devices,
            {**(env or {}), **process_env[i]},
            cwd=process_cwd[i],
        )
        for i in range(2)
    ]
