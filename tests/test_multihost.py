"""Separate hosts, for real: each host a network namespace with its own address on a switch
(tests/infra/netns.py), one `unclip launch --nnodes 2 --node-rank R --master-addr A` per host,
real DeepSpeed ranks over gloo between them, one shared filesystem.

No interface variable is set, as for a new user: the launcher must find the interface that
reaches the master. Then a host's link pulled mid-run (the survivor names it; a restart of
every node resumes bit-identically), a peer that dies while the group forms and a node that
never starts (both end within deepspeed.timeout_s), and the DeepSpeed hostfile launcher over
ssh into the hosts (an sshd per namespace, tests/infra/sshd.py).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from types import SimpleNamespace

import pytest

from tests.helpers import (
    TINY_PRIOR, differing, end_state, env_for_tests, explain, latest_step, losses, merged, write_job,
)
from tests.infra import netns, sshd
from tests.infra.nodes import launch_job

pytestmark = pytest.mark.slow

TIMEOUT_S = 10  # deepspeed.timeout_s: every collective, and the rendezvous, give up after this
STEPS = 60
JOB = merged(
    TINY_PRIOR, train={**TINY_PRIOR["train"], "steps": STEPS}, deepspeed={"zero_stage": 2, "timeout_s": TIMEOUT_S},
    checkpoint={"every_steps": 10, "keep_last": 10},
)
RUN_S = 300  # the most one launch of this job may take on a loaded 2-core machine


def user_env() -> dict[str, str]:
    """A user's environment: no interface chosen by hand."""
    env = env_for_tests()
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def needs_namespaces() -> None:
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(f"separate hosts need network namespaces: {reason}")


@pytest.fixture
def hosts():
    needs_namespaces()
    with netns.Hosts(2) as made:
        yield made


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny prior on 2 hosts, uninterrupted: 60 steps, a checkpoint every 10."""
    needs_namespaces()
    root = tmp_path_factory.mktemp("multihost")
    config = write_job(root / "prior.yaml", JOB)
    with netns.Hosts(2) as made:
        started = time.monotonic()
        nodes = launch_job(made, config, root / "run", 29500, user_env())
        codes = [node.wait(RUN_S) for node in nodes]
    return SimpleNamespace(config=config, run_dir=root / "run", nodes=nodes, codes=codes, wall_s=time.monotonic() - started)


def test_two_hosts_train_on_the_interface_that_reaches_the_master(reference):
    for host, (node, code) in enumerate(zip(reference.nodes, reference.codes)):
        assert code == 0, node.explain()
        # each host found its own interface (they differ by name), also the master for its own address
        assert (f"[unclip launch] node {host}: GLOO_SOCKET_IFNAME=eth{host}, NCCL_SOCKET_IFNAME=eth{host}: "
                f"eth{host} (10.213.0.{host + 1}) is the interface that routes to the master 10.213.0.1") in node.stdout
    assert sorted(losses(reference.run_dir)) == list(range(1, STEPS + 1))
    assert latest_step(reference.run_dir) == STEPS
    meta = json.loads((reference.run_dir / "checkpoints" / f"step_{STEPS:07d}" / "meta.json").read_text())
    assert meta["complete"] and meta["world_size"] == 2


def test_a_pulled_link_is_named_by_the_survivor_and_a_restart_resumes_exactly(reference, hosts, tmp_path):
    run_dir = tmp_path / "run"
    nodes = launch_job(hosts, reference.config, run_dir, 29510, user_env())
    nodes[0].wait_for("] step 15 |", timeout=RUN_S)
    hosts.link_down(1)
    down = time.monotonic()
    assert nodes[0].wait(RUN_S) == 1, nodes[0].explain()
    # the survivor's collective timed out, and the heartbeats say which node went silent
    named = nodes[0].first("stopped beating")
    assert named is not None and re.search(r"lost: node 1 \([^)]*10\.213\.0\.2\): rank 1 stopped beating", nodes[0].stderr), \
        nodes[0].explain()
    assert named - down < TIMEOUT_S + 5, f"named the lost node {named - down:.1f}s after the link went down"
    # the cut-off host fails too, and knows the master is out of its reach
    assert nodes[1].wait(RUN_S) == 1, nodes[1].explain()
    assert "10.213.0.1:29510, on the master node, does not answer" in nodes[1].stderr, nodes[1].explain()
    saved = latest_step(run_dir)
    assert 10 <= saved < STEPS
    # plug the cable back in and restart every node: the job resumes at `saved`, ends as if never cut
    hosts.link_up(1)
    nodes = launch_job(hosts, reference.config, run_dir, 29520, user_env())
    for node in nodes:
        assert node.wait(RUN_S) == 0, node.explain()
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{saved:07d}'}" in nodes[0].stdout, nodes[0].explain()
    assert differing(end_state(run_dir, STEPS, 2), end_state(reference.run_dir, STEPS, 2)) == []
    assert losses(run_dir)[STEPS] == losses(reference.run_dir)[STEPS]


def test_a_peer_that_dies_while_the_group_forms_ends_the_job_on_every_host(hosts, tmp_path):
    config = write_job(tmp_path / "prior.yaml", merged(JOB, train={**JOB["train"], "steps": 4}))
    # host 1's user named an interface it does not have: its rank dies creating the process group
    nodes = launch_job(hosts, config, tmp_path / "run", 29530, user_env(), host_env={1: {"GLOO_SOCKET_IFNAME": "nosuch0"}})
    assert [node.wait(RUN_S) for node in nodes] == [1, 1], [node.explain() for node in nodes]
    died = nodes[1].first("[unclip worker] rank 1 failed")
    assert died is not None and "nosuch0" in nodes[1].stderr, nodes[1].explain()
    gave_up = nodes[0].first("[unclip worker] rank 0: the process group did not form")
    assert gave_up is not None, nodes[0].explain()
    assert gave_up - died < TIMEOUT_S + 5, f"host 0 waited {gave_up - died:.1f}s for a dead peer"
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_a_node_that_never_starts_ends_the_rendezvous_after_the_timeout(hosts, tmp_path):
    config = write_job(tmp_path / "prior.yaml", JOB)
    (node,) = launch_job(hosts, config, tmp_path / "run", 29540, user_env(), only=[0])
    rendezvous = node.wait_for("torch.distributed.run", timeout=RUN_S)  # the launcher prints torchrun's line
    assert node.wait(RUN_S) == 1, node.explain()
    assert "--rdzv-conf=timeout=10" in node.stdout
    # torchrun's static rendezvous waited deepspeed.timeout_s for the other node (its default: 600 s)
    waited = re.search(r"Timed out after (\d+) seconds waiting for clients\. 1/2 clients joined", node.stderr)
    assert waited and int(waited.group(1)) <= TIMEOUT_S + 2, node.explain()
    assert node.ended - rendezvous < TIMEOUT_S + 90, f"ended {node.ended - rendezvous:.1f}s after torchrun started"


def test_the_deepspeed_hostfile_launcher_runs_over_ssh_on_both_hosts(hosts, tmp_path):
    reason = sshd.unavailable_reason() or (None if shutil.which("pdsh") else "pdsh is missing (Debian: apt-get install pdsh)")
    if reason:
        pytest.skip(f"the DeepSpeed launcher reaches hosts with pdsh over ssh: {reason}")
    config = write_job(tmp_path / "prior.yaml", merged(JOB, train={**JOB["train"], "steps": 6}))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{addr} slots=1\n" for addr in hosts.addresses))
    with sshd.SshHosts(hosts, tmp_path / "ssh") as ssh:
        done = hosts.run(
            0, [*launch_argv(config, tmp_path / "run"), "--hostfile", str(hostfile)],
            env=ssh.env(user_env()), cwd=tmp_path, timeout=RUN_S,
        )
    assert done.returncode == 0, explain(done)
    out = done.stdout + done.stderr
    # pdsh prefixes each line with its host: each rank ran on its own host, found that host's interface
    for host, addr in enumerate(hosts.addresses):
        assert re.search(rf"^{re.escape(addr)}: \[unclip\] rank {host} on .*GLOO_SOCKET_IFNAME=eth{host}\b", out, re.M), out
    assert latest_step(tmp_path / "run") == 6
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_0000006" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["complete"]


def launch_argv(config, run_dir) -> list[str]:
    return [sys.executable, "-m", "launch", "launch", "--config", str(config), "--run-dir", str(run_dir)]
