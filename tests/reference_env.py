"""The PyTorch reference environment the parity tests call into (see tests/reference/requirements.txt)."""

from __future__ import annotations

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_python() -> str:
    exe = os.environ.get("LDM_JAX_REFERENCE_PYTHON", "")
    if not exe or not os.path.exists(exe):
        pytest.fail(
            "parity tests need the PyTorch reference environment: run `bash launch/local.sh test`, or set "
            f"LDM_JAX_REFERENCE_PYTHON to a Python with tests/reference/requirements.txt installed (got {exe!r})"
        )
    return exe


def run_reference(script: str, *args: str) -> subprocess.CompletedProcess:
    """Runs ``script`` in the reference environment; fails the test with its stderr when it fails."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([reference_python(), script, *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
