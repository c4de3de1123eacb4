"""A real one-node SLURM cluster for the tests: Debian's munged, slurmctld and slurmd, run as
root with a private key, slurm.conf, ports, state and logs in one temporary folder (loopback
only), started once per session by the `slurm` fixture (tests/conftest.py) and torn down after.

The node is this machine as `slurmd -C` describes it (CPUs, memory), at 127.0.0.1. Settings
a production cluster would not use, for fast tests:

    AuthInfo=cred_expire=5                 a requeued job may start again after 6 s (default
                                           121 s; smaller values fall back to the default)
    SchedulerParameters=sched_interval=1   pending jobs are looked at every second (default 60 s)
    MinJobAge=120                          a finished job stays visible to scontrol for 2 min

and for the tests to see and confine it: SlurmctldDebug=debug2 (the log shows each time-limit
check, `time_checks`), CommunicationParameters=NoCtldInAddrAny,NoInAddrAny (daemons and srun
listen on the node's address, 127.0.0.1 where the host name resolves to it, rather than on
every interface).

What cannot be configured: slurmctld checks time limits and sends `--signal` warnings once
every 30 s (at the first check no earlier than 30 s before the warning is due), so a warning
arrives up to 30 s before the lead asked for, and a time limit is enforced up to 30 s late.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}
TIME_CHECK_PERIOD_S = 30  # slurmctld's fixed period for time limits and --signal warnings


def unavailable() -> Optional[str]:
    """Why a cluster cannot run here (None when it can)."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM test cluster: {', '.join(missing)} not installed (Debian: apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "SLURM test cluster: slurmd must run as root to start jobs; run the tests as root"
    return None


def free_port() -> int:
    from launch.launchers import free_port as _free

    return _free()


class SlurmCluster:
    """A running cluster: `run` its commands, poll its jobs, read its daemons' logs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}  # add to the environment of every SLURM command
        self.daemons: list[tuple[str, subprocess.Popen]] = []
        self.started_at = 0.0

    # --- commands and job state ---------------------------------------------------------
    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()}\n{self.logs()}")
        return done

    def jobs(self, job_id: int) -> list[dict[str, str]]:
        """`scontrol show job` of a job (one record per array task); [] once it is forgotten."""
        done = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if done.returncode != 0:
            return []
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in done.stdout.splitlines() if line.strip()]

    def wait(self, job_id: int, done: Callable[[list[dict[str, str]]], bool], timeout: float, what: str,
             poll_s: float = 0.25) -> list[dict[str, str]]:
        """Poll the job's records until `done(records)`; an AssertionError with the job, its
        records and the daemons' logs after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.jobs(job_id)
            if records and done(records):
                return records
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: not {what} after {timeout:.0f} s: {records}\n{self.logs()}")
            time.sleep(poll_s)

    def wait_finished(self, job_id: int, timeout: float) -> list[dict[str, str]]:
        return self.wait(job_id, lambda rs: all(r["JobState"] in FINISHED for r in rs), timeout, "finished")

    def cancel_all(self, timeout: float = 60) -> None:
        self.run("scancel", "--full", "--user", "root", check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                return
            time.sleep(0.5)

    def set_partition(self, up: bool) -> None:
        """Partition DOWN: jobs are accepted and wait; UP: they start within a second."""
        self.run("scontrol", "update", "PartitionName=debug", f"State={'UP' if up else 'DOWN'}")

    def time_checks(self) -> list[float]:
        """When slurmctld checked time limits and sent `--signal` warnings (epoch seconds),
        from its log (SlurmctldDebug=debug2 writes a line at each check)."""
        text = (self.root / "log" / "slurmctld.log").read_text(errors="replace")
        stamps = re.findall(r"^\[([0-9T:.-]+)\] debug2: Testing job time limits", text, re.MULTILINE)
        return [datetime.datetime.strptime(t, "%Y-%m-%dT%H:%M:%S.%f").timestamp() for t in stamps]

    def next_time_check(self, timeout: float = 2 * TIME_CHECK_PERIOD_S + 10) -> float:
        """Wait for slurmctld's next time-limit check; its time."""
        seen = len(self.time_checks())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            checks = self.time_checks()
            if len(checks) > seen:
                return checks[-1]
            time.sleep(0.05)
        raise AssertionError(f"slurmctld logged no time-limit check in {timeout:.0f} s\n{self.logs()}")

    def logs(self, tail: int = 40) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            lines = path.read_text(errors="replace").splitlines()[-tail:] if path.exists() else []
            out.append(f"--- {name} (last {tail} lines)\n" + "\n".join(lines))
        return "\n".join(out)

    # --- start and stop -------------------------------------------------------------------
    def _spawn(self, name: str, *cmd: str) -> None:
        # a session of their own: a Ctrl-C of the tests reaches the tests, which then cancel the
        # jobs and stop the daemons in order, rather than the daemons dying under running jobs
        with open(self.root / "log" / f"{name}.stdout", "wb") as log:
            proc = subprocess.Popen(list(cmd), env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.daemons.append((name, proc))

    def start(self, timeout: float = 60) -> None:
        root = self.root
        for sub in ("munge", "log", "state", "spool"):
            (root / sub).mkdir()
        key_dir = root / "key"
        key_dir.mkdir(mode=0o700)
        key = key_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge_socket = root / "munge" / "munge.socket"
        self._spawn("munged", "munged", "--foreground", f"--key-file={key}", f"--socket={munge_socket}",
                    f"--pid-file={root / 'munge' / 'munged.pid'}", f"--log-file={root / 'log' / 'munged.log'}",
                    f"--seed-file={root / 'munge' / 'munged.seed'}")
        self._until(munge_socket.exists, timeout, "munged's socket")
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
        self.node = re.search(r"NodeName=(\S+)", node).group(1)
        try:  # jobs find their first node (torchrun's rendezvous host) by this name
            socket.gethostbyname(self.node)
        except OSError:
            raise RuntimeError(f"SLURM test cluster: the host name {self.node!r} does not resolve; "
                               "add it to /etc/hosts") from None
        self.conf.write_text(slurm_conf(root, node, munge_socket, free_port(), free_port()))
        self.started_at = time.time()
        self._spawn("slurmctld", "slurmctld", "-D", "-i", "-f", str(self.conf))
        self._spawn("slurmd", "slurmd", "-D", "-N", self.node, "-f", str(self.conf))
        self._until(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
                    timeout, "the node idle")

    def _until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"SLURM test cluster: {name} exited ({proc.returncode}) "
                                       f"waiting for {what}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"SLURM test cluster: no {what} after {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.2)

    def stop(self) -> None:
        if any(name == "slurmctld" for name, _ in self.daemons):
            with contextlib.suppress(Exception):
                self.cancel_all()
        for _, proc in reversed(self.daemons):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._kill_leftover_jobs()

    def _kill_leftover_jobs(self) -> None:
        """SIGKILL what is left of this cluster's jobs (slurmstepd outlives slurmd by design):
        the processes whose environment names this cluster's slurm.conf."""
        mark = f"SLURM_CONF={self.conf}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if mark in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue  # gone already, or not ours to read


def slurm_conf(root: Path, node_line: str, munge_socket: Path, ctld_port: int, slurmd_port: int) -> str:
    node = re.search(r"NodeName=(\S+)", node_line).group(1)
    return f"""\
ClusterName=unclip-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=debug2
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
ReturnToService=2
MinJobAge=120
KillWait=30
InactiveLimit=0
Waittime=0
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def running_cluster() -> Iterator[SlurmCluster]:
    # munged insists that every folder above its socket be searchable by all: not pytest's 0700 tmp
    root = Path(tempfile.mkdtemp(prefix="unclip-slurm-"))
    root.chmod(0o755)
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
