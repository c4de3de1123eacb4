"""An sshd on every host of a `Hosts`, and a client set up to reach them, as a cluster has.

`SshHosts(hosts, workdir)` makes a user key and a host key with ssh-keygen, starts Debian's
OpenSSH server inside each namespace on that host's own address (port 22, keys only, root
allowed by key), and writes a client config with the hosts' keys pinned in a known_hosts
file (StrictHostKeyChecking stays on). The machine's own ~/.ssh is never touched: `env()`
puts a `bin/ssh` first on PATH that runs the real /usr/bin/ssh with this config, so every
tool that calls `ssh` (the DeepSpeed launcher, pdsh) uses it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from .netns import Hosts

SSHD = "/usr/sbin/sshd"


def unavailable_reason() -> Optional[str]:
    """Why sshd cannot run here, or None."""
    if not os.path.exists(SSHD):
        return f"{SSHD} is missing (Debian: apt-get install openssh-server)"
    if shutil.which("ssh-keygen") is None or not os.path.exists("/usr/bin/ssh"):
        return "the OpenSSH client is missing (Debian: apt-get install openssh-client)"
    return None


class SshHosts:
    def __init__(self, hosts: Hosts, workdir: Path) -> None:
        self.hosts = hosts
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = self.dir / "id_ed25519"
        self.host_key = self.dir / "host_ed25519"
        self.config = self.dir / "ssh_config"
        self.bin = self.dir / "bin"

    def __enter__(self) -> "SshHosts":
        self._keys()
        self._client()
        for i in range(self.hosts.count):
            self._start(i)
        for i in range(self.hosts.count):
            self._wait_listening(i)
        return self

    def __exit__(self, *exc: object) -> None:
        pass  # the sshds live in the namespaces: Hosts.close() ends them with every other process there

    def _keys(self) -> None:
        for path in (self.key, self.host_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "unclip-test", "-f", str(path)],
                           check=True, capture_output=True, timeout=30)
        (self.dir / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        host_pub = Path(f"{self.host_key}.pub").read_text().split()
        (self.dir / "known_hosts").write_text(
            "".join(f"{addr} {host_pub[0]} {host_pub[1]}\n" for addr in self.hosts.addresses))
        # privilege separation needs this directory (the package's service would make it)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    def _client(self) -> None:
        self.config.write_text(
            "Host *\n"
            "  User root\n"
            f"  IdentityFile {self.key}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.dir / 'known_hosts'}\n"
            "  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n"
            "  ConnectTimeout 10\n"
        )
        self.bin.mkdir(exist_ok=True)
        wrapper = self.bin / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {self.config} "$@"\n')
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    def _start(self, host: int) -> None:
        addr = self.hosts.addresses[host]
        config = self.dir / f"sshd_config.{host}"
        config.write_text(
            f"ListenAddress {addr}\n"
            "Port 22\n"
            f"HostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            f"PidFile {self.dir / f'sshd.{host}.pid'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"  # the keys live in a test's temporary directory
            "X11Forwarding no\n"
            "PrintMotd no\n"
        )
        log = open(self.dir / f"sshd.{host}.log", "w")
        self.hosts.popen(host, [SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)

    def _wait_listening(self, host: int, timeout: float = 20) -> None:
        probe = [sys.executable, "-c", f"import socket; socket.create_connection(({self.hosts.addresses[host]!r}, 22), 1)"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.hosts.run(host, probe, timeout=10).returncode == 0:
                return
            time.sleep(0.2)
        log = (self.dir / f"sshd.{host}.log").read_text()
        raise RuntimeError(f"sshd on host {host} did not listen within {timeout}s:\n{log}")

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """`base` with this cluster's `ssh` first on PATH."""
        env = dict(base)
        env["PATH"] = f"{self.bin}:{env.get('PATH', os.defpath)}"
        return env
