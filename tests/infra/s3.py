"""A real S3 API server for the tests: moto's server (the `test` extra's `moto[server]`), started
as its own process on a free 127.0.0.1 port, once per test session.

Commands under test reach it the way users reach MinIO or Ceph: `AWS_ENDPOINT_URL` (or a
config's `storage_options.endpoint_url`) and credentials in the standard AWS variables. The
secret is a distinctive string, so tests can assert it never reaches any output. The
session's one server is the `s3_server` fixture (tests/conftest.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

START_TIMEOUT_S = 60.0
SECRET = "unclip-test-secret-7f3a9c"  # must never appear in anything a command prints


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """One moto server process; `env` reaches it like any S3-compatible endpoint."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server not answering on {self.endpoint} after {START_TIMEOUT_S:.0f}s") from None
                time.sleep(0.1)

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    @property
    def credentials(self) -> dict[str, str]:
        """The standard AWS variables, isolated from any ~/.aws of the machine running the tests."""
        return {
            "AWS_ACCESS_KEY_ID": "unclip-test-key", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask an instance-metadata address
        }

    @property
    def env(self) -> dict[str, str]:
        """Variables for a subprocess that finds this server by `AWS_ENDPOINT_URL`."""
        return {**self.credentials, "AWS_ENDPOINT_URL": self.endpoint}

    def fs(self):
        """An s3fs filesystem on this server, for the tests' own checks."""
        import s3fs

        return s3fs.S3FileSystem(key="unclip-test-key", secret=SECRET, endpoint_url=self.endpoint,
                                 skip_instance_cache=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()

