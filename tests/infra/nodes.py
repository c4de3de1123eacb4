"""One `unclip launch --nnodes N --node-rank R --master-addr A` per host of a `Hosts`.

`launch_job(hosts, config, run_dir, port)` starts the job's node launcher on every host, as a
user would on each machine of a cluster (the master is host 0's address), and returns one
`Node` per host. A `Node` collects its output while it runs, with the time each line came,
so that a test can act mid-run (`wait_for`) and measure how long a failure took to surface.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .netns import Hosts


class Node:
    def __init__(self, hosts: Hosts, host: int, argv: list[str], env: dict[str, str]) -> None:
        self.host = host
        self.started = time.monotonic()
        self.ended: Optional[float] = None
        self.lines: dict[str, list[tuple[float, str]]] = {"stdout": [], "stderr": []}
        self.proc = hosts.popen(host, argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._pumps = [threading.Thread(target=self._pump, args=(name,), daemon=True) for name in self.lines]
        for pump in self._pumps:
            pump.start()
        threading.Thread(target=self._reap, daemon=True).start()

    def _pump(self, name: str) -> None:
        for line in getattr(self.proc, name):
            self.lines[name].append((time.monotonic(), line))

    def _reap(self) -> None:
        self.proc.wait()
        self.ended = time.monotonic()

    @property
    def stdout(self) -> str:
        return "".join(line for _, line in self.lines["stdout"])

    @property
    def stderr(self) -> str:
        return "".join(line for _, line in self.lines["stderr"])

    def first(self, text: str, stream: str = "stderr") -> Optional[float]:
        """When the first line containing `text` came (monotonic seconds), or None."""
        return next((t for t, line in list(self.lines[stream]) if text in line), None)

    def wait_for(self, text: str, timeout: float, stream: str = "stdout") -> float:
        """Block until a line containing `text` has come; its time. AssertionError on timeout or exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.first(text, stream)
            if found is not None:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"host {self.host}: no {text!r} within {timeout}s\n{self.explain()}")

    def wait(self, timeout: float) -> int:
        """The exit code; the process is killed (and AssertionError raised) after `timeout` s."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"host {self.host}: still running after {timeout}s\n{self.explain()}") from None
        for pump in self._pumps:
            pump.join(timeout=10)
        while self.ended is None:
            time.sleep(0.01)
        return self.proc.returncode

    def explain(self) -> str:
        return (f"host {self.host}: exit {self.proc.poll()}\n--- stdout\n{self.stdout[-3000:]}\n"
                f"--- stderr\n{self.stderr[-6000:]}")


def node_argv(hosts: Hosts, host: int, config: Path, run_dir: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "launch", "launch", "--config", str(config), "--run-dir", str(run_dir),
        "--nnodes", str(hosts.count), "--node-rank", str(host), "--master-addr", hosts.addresses[0],
        "--master-port", str(port), "--nproc", "1",
    ]


def launch_job(
    hosts: Hosts, config: Path, run_dir: Path, port: int, env: dict[str, str],
    host_env: Optional[dict[int, dict[str, str]]] = None, only: Optional[list[int]] = None,
) -> list[Node]:
    """Start the job's launcher on every host (or the hosts in `only`); `host_env` adds per-host variables."""
    return [
        Node(hosts, h, node_argv(hosts, h, config, run_dir, port), {**env, **(host_env or {}).get(h, {})})
        for h in (range(hosts.count) if only is None else only)
    ]
