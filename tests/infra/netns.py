"""Separate hosts on one machine: Linux network namespaces joined by a switch.

`Hosts(n)` makes n namespaces `unclip-t<pid>-h<i>`, each a host with its own interface
`eth<i>` and address 10.213.0.<i+1>/24, and one namespace holding the switch: a bridge with
one veth port per host. Nothing changes in the machine's own namespace: its interfaces,
routes and ports are never touched, and a host can reach only its own loopback and the
other hosts. Every host shares the filesystem (a network namespace isolates only the
network). Taking a host's link down (`link_down`) is pulling its cable.

On exit every process left in a namespace is killed and the namespaces are deleted, also
when the test failed; namespaces left by a test process that died are swept at the next start.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from typing import Optional, Sequence

SUBNET = "10.213.0"
_PREFIX = "unclip-t"


def unavailable_reason() -> Optional[str]:
    """Why this machine cannot make network namespaces, or None when it can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (Debian: apt-get install iproute2)"
    if os.geteuid() != 0:
        return "making network namespaces needs root (ip netns add)"
    probe = f"{_PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if made.returncode != 0:
        return f"`ip netns add` failed here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def _ip(*args: str, timeout: float = 30) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace(name: str) -> None:
    """SIGKILL every process in namespace `name`, then delete it."""
    for _ in range(50):
        pids = [int(p) for p in _ip("netns", "pids", name).split()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def sweep_stale() -> None:
    """Delete the namespaces of test processes that died before they could clean up."""
    for line in _ip("netns", "list").splitlines():
        match = re.match(rf"({re.escape(_PREFIX)}(\d+)-\S+)", line)
        if match and not _alive(int(match.group(2))):
            _kill_namespace(match.group(1))


class Hosts:
    """`count` hosts, each a network namespace with one address on a shared switch."""

    def __init__(self, count: int) -> None:
        tag = f"{_PREFIX}{os.getpid()}"
        self.count = count
        self.namespaces = [f"{tag}-h{i}" for i in range(count)]
        self.interfaces = [f"eth{i}" for i in range(count)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(count)]
        self._switch = f"{tag}-sw"
        self._made: list[str] = []
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Hosts":
        sweep_stale()
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make(self) -> None:
        for name in (self._switch, *self.namespaces):
            _ip("netns", "add", name)
            self._made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", self._switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self._switch, "link", "set", "br0", "up")
        for i, (ns, ifname, addr) in enumerate(zip(self.namespaces, self.interfaces, self.addresses)):
            # made inside the switch's namespace, so no name can clash with the machine's own links
            _ip("-n", self._switch, "link", "add", f"port{i}", "type", "veth", "peer", "name", ifname, "netns", ns)
            _ip("-n", self._switch, "link", "set", f"port{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up")

    def popen(self, host: int, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start `argv` on host `host` (inside its namespace); killed at the latest on close."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespaces[host], *argv], **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, host: int, argv: Sequence[str], *, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Run `argv` on host `host` to its end (at most `timeout` s), capturing its output."""
        return subprocess.run(
            ["ip", "netns", "exec", self.namespaces[host], *argv], capture_output=True, text=True, timeout=timeout,
            **kwargs,
        )

    def link_down(self, host: int) -> None:
        """Pull host `host`'s cable: its interface goes down, the other hosts stop hearing it."""
        _ip("-n", self.namespaces[host], "link", "set", self.interfaces[host], "down")

    def link_up(self, host: int) -> None:
        _ip("-n", self.namespaces[host], "link", "set", self.interfaces[host], "up")

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for name in reversed(self._made):
            _kill_namespace(name)
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._made.clear()
